"""What runs beside a job's engine call in the worker: heartbeat, cancel watch, progress.

A watcher thread beats the job's heartbeat every JOB_HEARTBEAT_SECONDS (a job
whose worker died stops beating, and check_jobs fails it as "worker lost") and
looks for a cancel request every JOB_CANCEL_POLL_SECONDS, setting the event the
engine polls between chunks, so a cancel reaches the engine within a second.
The engine's progress callback is the job's ProgressSender.
"""
from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import DatabaseError, connection

from . import services
from .models import Job
from .progress import ProgressSender

log = logging.getLogger(__name__)


class JobRunner:
    """`with JobRunner(job) as runner:` then give the engine `runner.cancel` and `runner.progress`."""

    def __init__(self, job: Job) -> None:
        self.job_id = job.pk
        self.cancel = threading.Event()
        self.progress = ProgressSender(job.pk)
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"job-{job.pk}-watch", daemon=True)

    def __enter__(self) -> "JobRunner":
        self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._watcher.join()
        self.progress.close()

    def _watch(self) -> None:
        next_beat = time.monotonic() + settings.JOB_HEARTBEAT_SECONDS
        try:
            while not self._done.wait(settings.JOB_CANCEL_POLL_SECONDS):
                beat = time.monotonic() >= next_beat
                if beat:
                    next_beat += settings.JOB_HEARTBEAT_SECONDS
                try:
                    running, cancel_requested = services.job_control(self.job_id, beat=beat)
                except DatabaseError as exc:
                    # The job goes on; a database gone for good shows as a lost worker.
                    log.warning("job %s: heartbeat or cancel check failed: %s", self.job_id, exc)
                    continue
                if cancel_requested or not running:
                    # Not running any more: swept as lost meanwhile; its result has no home.
                    self.cancel.set()
        finally:
            connection.close()
