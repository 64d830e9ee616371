"""Beat's scheduler: django-celery-beat's, plus the sweeps, run in beat's own process.

The sweeps (jobs whose worker was lost or whose progress stalled; queued jobs whose
message Redis lost; disks whose protection changed; hosts' access to Redis) watch
the workers, so they must not run on a worker: with the only worker dead, a task
sent to it would wait with the job it should have failed. Beat runs once per installation and is restarted
when it exits (webui.launcher, systemd, docker-compose), so each sweep runs here,
every interval, in a thread of its own: a slow notification holds back neither
the schedules nor the other sweeps.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import close_old_connections, connection
from django_celery_beat.schedulers import DatabaseScheduler

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    name: str
    interval: float
    run: Callable[[], object]
    due_at: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def sweeps() -> list[Sweep]:
    from . import services

    return [
        Sweep("check jobs", settings.CHECK_JOBS_SECONDS, services.check_jobs),
        Sweep("resend lost jobs", settings.CHECK_JOBS_SECONDS, services.resend_lost_jobs),
        Sweep("check protection", settings.CHECK_PROTECTION_SECONDS, services.check_protection),
        Sweep("host access", settings.CHECK_JOBS_SECONDS, services.hosts.sync_access),
    ]


class Sweeper:
    """Starts each sweep when it is due and the previous run of it has ended."""

    def __init__(self, due: list[Sweep], clock: Callable[[], float] = time.monotonic):
        self.due = due
        self.clock = clock

    def tick(self) -> float:
        """Starts what is due; returns the seconds until the next sweep is due."""
        now = self.clock()
        for sweep in self.due:
            if now >= sweep.due_at and not sweep.busy():
                sweep.due_at = now + sweep.interval
                sweep.thread = threading.Thread(target=self._run, args=(sweep,),
                                                name=f"sweep: {sweep.name}", daemon=True)
                sweep.thread.start()
        return max(0.0, min(sweep.due_at for sweep in self.due) - now)

    @staticmethod
    def _run(sweep: Sweep) -> None:
        close_old_connections()
        try:
            sweep.run()
        except Exception:  # the next round tries again; beat itself must go on
            log.exception("sweep %r failed", sweep.name)
        finally:
            connection.close()


class Scheduler(DatabaseScheduler):
    """`celery beat --scheduler webui.beat:Scheduler`."""

    def __init__(self, *args, **kwargs):
        self.sweeper = Sweeper(sweeps())
        super().__init__(*args, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        interval = super().tick(*args, **kwargs)
        return min(interval, self.sweeper.tick())
