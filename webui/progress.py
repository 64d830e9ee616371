"""Live progress: the one place that sends to the channel layer.

A worker wraps the engine's progress callback in a ProgressSender. Browsers get
at most one event per PROGRESS_SEND_SECONDS per job (extras are dropped, the
newest is kept for the flush); the database gets a snapshot at most every
PROGRESS_SAVE_SECONDS, so a reload shows where the job is. The finished event,
a new phase and new read errors skip the throttle. The database is the truth:
a lost event costs nothing but a moment of staleness, so a channel layer that
is down (Redis gone) is logged once and never fails the job.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Literal, Optional, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from .models import Job
from .payloads import EMPTY_PROGRESS, JobSerializer

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"
# A layer that does not answer within this long is treated as down for this message.
SEND_TIMEOUT_SECONDS = 2.0


def job_group(job_id: int) -> str:
    return f"job.{job_id}"


# What this module sends to the channel layer, which consumers forward to browsers as it came.
PROGRESS_MESSAGE, STATE_MESSAGE = "job.progress", "job.state"


class JobProgress(TypedDict):
    job: int
    state: str
    progress: dict[str, Any]  # payloads.ProgressSerializer's shape


class JobProgressMessage(TypedDict):
    type: Literal["job.progress"]
    data: JobProgress


class JobStateMessage(TypedDict):
    type: Literal["job.state"]
    data: dict[str, Any]  # JobSerializer's shape, the same as GET /api/jobs/<id>/


class ProgressSender:
    """Callable with each `imaging.base.progress.ProgressEvent`; `with` it to flush at the end."""

    def __init__(self, job_id: int, *, state: str = Job.State.RUNNING,
                 clock: Callable[[], float] = time.monotonic,
                 send_seconds: Optional[float] = None,
                 save_seconds: Optional[float] = None) -> None:
        self.job_id = job_id
        self.state = str(state)
        self._clock = clock
        self._send_seconds = (settings.PROGRESS_SEND_SECONDS if send_seconds is None
                              else send_seconds)
        self._save_seconds = (settings.PROGRESS_SAVE_SECONDS if save_seconds is None
                              else save_seconds)
        self._latest: Any = None  # the newest event, sent or not
        self._last_sent: Any = None
        self._sent_at = float("-inf")
        self._saved_at = float("-inf")
        self._unsent = self._unsaved = False
        self._saved_done: Optional[int] = None
        self._channel = ChannelSender()

    def __call__(self, event) -> None:
        self._latest = event
        self._unsent = self._unsaved = True
        now = self._clock()
        if self._urgent(event) or now - self._sent_at >= self._send_seconds:
            self._send(now)
        if event.finished or now - self._saved_at >= self._save_seconds:
            self._save(now)

    def flush(self) -> None:
        """Sends and saves the newest event if the throttle held it back."""
        now = self._clock()
        if self._unsent:
            self._send(now)
        if self._unsaved:
            self._save(now)

    close = flush

    def __enter__(self) -> "ProgressSender":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()

    def _urgent(self, event) -> bool:
        previous = self._last_sent
        return (event.finished or previous is None or event.phase != previous.phase
                or event.bad_bytes > previous.bad_bytes)

    def _send(self, now: float) -> None:
        self._sent_at, self._last_sent, self._unsent = now, self._latest, False
        message: JobProgressMessage = {"type": PROGRESS_MESSAGE, "data": {
            "job": self.job_id, "state": self.state, "progress": progress_data(self._latest)}}
        self._channel.send(message, job_group(self.job_id))

    def _save(self, now: float) -> None:
        self._saved_at, self._unsaved = now, False
        event = self._latest
        changes: dict[str, Any] = {"progress": progress_data(event)}
        if event.done != self._saved_done:
            changes["progress_moved_at"] = timezone.now()
            self._saved_done = event.done
        Job.objects.filter(pk=self.job_id).update(**changes)


def progress_data(event) -> dict[str, Any]:
    """An engine's progress event in payloads.ProgressSerializer's shape, sent now."""
    return {**{name: getattr(event, name) for name in EMPTY_PROGRESS if name != "sent_at"},
            "sent_at": time.time()}


def send_job_state(job: Job) -> None:
    """Tells the job's watchers and the dashboard of a transition, in the API's shape."""
    message: JobStateMessage = {"type": STATE_MESSAGE, "data": JobSerializer(job).data}
    ChannelSender().send(message, job_group(job.pk))


class ChannelSender:
    """group_send to a job's group and the dashboard; a failure is logged once, then quiet."""

    def __init__(self) -> None:
        self._failing = False

    def send(self, message: JobProgressMessage | JobStateMessage, group: str) -> None:
        try:
            async_to_sync(self._send_both)(message, group)
        except Exception as exc:  # a layer that is down must not fail the job
            if not self._failing:
                log.warning("live progress not sent (%s: %s); the database still has it",
                            type(exc).__name__, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("live progress flows again")
            self._failing = False

    @staticmethod
    async def _send_both(message, group: str) -> None:
        layer = get_channel_layer()
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await layer.group_send(group, message)
            await layer.group_send(DASHBOARD_GROUP, message)
