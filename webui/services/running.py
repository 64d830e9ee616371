"""Running jobs: claimed once, watched while they run, finished, failed or cancelled.

A job moves queued -> running by a conditional update, so a message delivered
twice runs it once; every later transition is conditional too, so a late
report from a worker declared lost changes nothing. A running job whose worker
stops beating fails as "worker lost"; one whose progress stops is flagged
stalled and notified, once.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import PurePath
from typing import Any, Optional

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from imaging.base.errors import Cancelled

from ..models import Job
from ..payloads import JobSerializer
from .catalog import read_catalog, store_catalog
from .errors import Refused
from .jobs import announce, reloaded, requester
from .notifications import job_summary, job_urls, notify, notify_failure, notify_later, \
    progress_text
from .registry import KINDS

WORKER_LOST = "worker lost"


def claim_job(job_id: int, worker: str, now: Optional[dt.datetime] = None) -> Optional[Job]:
    """queued -> running, once: None for a duplicate delivery or a job cancelled meanwhile."""
    now = now or timezone.now()
    claimed = Job.objects.filter(pk=job_id, state=Job.State.QUEUED).update(
        state=Job.State.RUNNING, worker=worker, started=now, heartbeat_at=now,
        progress_moved_at=now, note="")
    if not claimed:
        return None
    job = reloaded(Job(pk=job_id))
    announce(job)
    return job


def job_control(job_id: int, now: Optional[dt.datetime] = None,
                beat: bool = False) -> tuple[bool, bool]:
    """(still running, cancel requested) for a running job's watcher; `beat` records a heartbeat."""
    if beat:
        Job.objects.filter(pk=job_id, state=Job.State.RUNNING).update(
            heartbeat_at=now or timezone.now())
    row = Job.objects.filter(pk=job_id).values_list("state", "cancel_requested").first()
    if row is None:
        return False, True
    return row[0] == Job.State.RUNNING, row[1]


def finish_job(job: Job, result: Any, now: Optional[dt.datetime] = None) -> Job:
    """Record what the engine returned: images, datastore figures, state, alerts, follow-ups."""
    now = now or timezone.now()
    kind = KINDS[job.kind]
    outcome = _jsonable(result)
    state, error = kind.judge(outcome)
    disk_id = kind.catalog_disk_id(job)
    catalog = None
    if kind.changes_catalog and job.datastore_id:
        try:
            catalog = read_catalog(job.datastore, disk_id, images=kind.changes_images)
        except Refused as exc:
            state, error = Job.State.FAILED, f"done, but the catalog cannot read it: {exc}"
    with transaction.atomic():
        if catalog is not None:
            store_catalog(job.datastore, *catalog, disk_id=disk_id, now=now)
        fields = {"state": state, "error": error, "result": outcome, "finished": now,
                  **kind.recorded(outcome)}
        if not Job.objects.filter(pk=job.pk, state=Job.State.RUNNING).update(**fields):
            return reloaded(job)
        kind.finished(job, now)
        job = reloaded(job)
        kind.ended(job, now)
        if state == Job.State.FAILED:
            notify_failure(job, kind.title(job))
        elif job.schedule_id and job.schedule.notify_on_success:
            notify_later(f"{kind.title(job)} succeeded", job_summary(job),
                         job.schedule.notification_urls())
        announce(job)
    if state != Job.State.FAILED:
        kind.follow_up(job)
    return job


def fail_job(job: Job, error: BaseException | str, now: Optional[dt.datetime] = None) -> Job:
    """The engine stopped: failed, or cancelled if it stopped because it was asked to."""
    now = now or timezone.now()
    cancelled = isinstance(error, Cancelled)
    state = Job.State.CANCELLED if cancelled else Job.State.FAILED
    with transaction.atomic():
        if not Job.objects.filter(pk=job.pk, state__in=Job.ACTIVE_STATES).update(
                state=state, error=str(error), finished=now):
            return reloaded(job)
        job = reloaded(job)
        _after_failure(job, now)
    return job


def cancel_job(job: Job, user=None, now: Optional[dt.datetime] = None) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (the engine obeys)."""
    now = now or timezone.now()
    who = f" by {user}" if requester(user) else ""
    with transaction.atomic():
        if Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(
                state=Job.State.CANCELLED, cancel_requested=True, finished=now,
                error=f"cancelled{who} before it started"):
            job = reloaded(job)
            announce(job)
            return job
        if not Job.objects.filter(pk=job.pk, state=Job.State.RUNNING).update(cancel_requested=True):
            job = reloaded(job)
            raise Refused(f"job #{job.pk} is {job.state}: nothing to cancel")
        return reloaded(job)


def fail_jobs_left_running(worker: str, now: Optional[dt.datetime] = None) -> int:
    """A worker starting up runs nothing yet: jobs its previous life left running are lost."""
    now = now or timezone.now()
    lost = 0
    for job in Job.objects.filter(state=Job.State.RUNNING, worker=worker,
                                  host__name=settings.HOST_NAME):
        lost += _fail_if_running(job, WORKER_LOST, now)
    return lost


def job_snapshot(job_id: int) -> Optional[dict]:
    """The job as the API shows it, or None if there is no such job."""
    job = Job.objects.select_related("host").filter(pk=job_id).first()
    return None if job is None else dict(JobSerializer(job).data)


def _fail_if_running(job: Job, error: str, now: dt.datetime) -> bool:
    with transaction.atomic():
        if not Job.objects.filter(pk=job.pk, state=Job.State.RUNNING).update(
                state=Job.State.FAILED, error=error, finished=now):
            return False
        _after_failure(reloaded(job), now)
    return True


def _after_failure(job: Job, now: dt.datetime) -> None:
    kind = KINDS[job.kind]
    kind.ended(job, now)
    if job.state == Job.State.FAILED:
        notify_failure(job, kind.title(job))
    announce(job)


def _jsonable(value: Any) -> Any:
    """An engine result as JSON-safe data (what a job row keeps)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a job's result")


def check_jobs(now: Optional[dt.datetime] = None) -> tuple[int, int]:
    """Running jobs whose worker stopped beating fail as "worker lost"; jobs whose progress
    has not moved are flagged stalled and notified, once. Returns (lost, stalled)."""
    now = now or timezone.now()
    lost = 0
    for job in Job.objects.lost(now):
        lost += _fail_if_running(job, WORKER_LOST, now)
    stalled = 0
    for job in Job.objects.stalled(now).filter(stall_notified=False).select_related(
            "host", "disk", "target_disk", "datastore", "schedule"):
        if Job.objects.filter(pk=job.pk, state=Job.State.RUNNING, stall_notified=False).update(
                stall_notified=True):
            stalled += 1
            notify(f"{KINDS[job.kind].title(job)} is stalled",
                   f"Its progress has not moved for {settings.JOB_STALL_SECONDS:.0f} seconds "
                   f"({progress_text(job)}).", job_urls(job))
            job.stall_notified = True
            announce(job)
    return lost, stalled
