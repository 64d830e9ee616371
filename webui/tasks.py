"""Celery tasks: ids in, one engine call, services out. No rules here.

Every job task claims its job first (queued -> running, once), so a message
delivered twice runs the job once; the engine runs inside a JobRunner that
beats the heartbeat, watches for cancel and sends progress.
"""
from __future__ import annotations

import zoneinfo
from typing import Any, Callable

from celery import shared_task
from django.conf import settings

import imaging.backup
import imaging.export
import imaging.gc
import imaging.importer
import imaging.prune
import imaging.recompress
import imaging.restore
import imaging.verify
from imaging.errors import ImagingError
from imaging.progress import Progress

from . import services
from .models import Job
from .runner import JobRunner

EngineCall = Callable[[Job, Progress], Any]


def _run_job(task, job_id: int, work: EngineCall) -> None:
    job = services.claim_job(job_id, task.request.hostname or settings.HOST_NAME)
    if job is None:
        return  # a duplicate delivery, or cancelled while it waited
    try:
        with JobRunner(job) as runner:
            result = work(job, Progress(job.kind, 0, runner.progress, cancel=runner.cancel))
        services.finish_job(job, result)
    except ImagingError as exc:
        services.fail_job(job, exc)
    except Exception as exc:  # a bug: the job must not stay running; Celery logs the traceback
        services.fail_job(job, f"internal error: {type(exc).__name__}: {exc}")
        raise


@shared_task(bind=True)
def run_backup(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.backup.backup(
        job.disk.path, job.datastore.path, expected_id=job.disk.stable_id,
        mode=job.params["mode"], level=job.params["level"], force=job.params.get("force", False),
        deltas=job.params.get("deltas", True), progress=progress))


@shared_task(bind=True)
def run_restore(self, job_id: int) -> None:
    def restore(job: Job, progress: Progress):
        target, allowed = services.restore_target(job)
        return imaging.restore.restore(job.image.path, target, verify=job.params.get("verify", True),
                                       progress=progress, allowed_targets=allowed,
                                       partition=job.params.get("partition"))

    _run_job(self, job_id, restore)


@shared_task(bind=True)
def run_verify(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.verify.verify(job.image.path,
                                                                       progress=progress))


@shared_task(bind=True)
def run_recompress(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.recompress.recompress(
        job.image.path, job.params["level"], progress=progress))


@shared_task(bind=True)
def run_export(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.export.export(
        job.image.path, services.export_destination(job), level=job.params["level"],
        long_distance=job.params["long_distance"], split_size=job.params["split_size"],
        progress=progress))


@shared_task(bind=True)
def run_import(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.importer.import_archive(
        services.import_files(job), job.datastore.path, disk_id=job.params["disk_id"],
        level=job.params["level"], progress=progress))


@shared_task(bind=True)
def run_prune(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.prune.prune(
        job.datastore.path, job.disk.stable_id, imaging.prune.Retention(**job.params["retention"]),
        progress=progress, tz=zoneinfo.ZoneInfo(job.params["time_zone"])))


@shared_task(bind=True)
def run_gc(self, job_id: int) -> None:
    _run_job(self, job_id, lambda job, progress: imaging.gc.collect(job.datastore.path,
                                                                    progress=progress))


JOB_TASKS = {
    Job.Kind.BACKUP: run_backup, Job.Kind.RESTORE: run_restore, Job.Kind.VERIFY: run_verify,
    Job.Kind.RECOMPRESS: run_recompress, Job.Kind.EXPORT: run_export,
    Job.Kind.IMPORT: run_import, Job.Kind.PRUNE: run_prune, Job.Kind.GC: run_gc,
}


@shared_task
def run_schedule(schedule_id: int) -> None:
    services.run_schedule(schedule_id)


@shared_task(bind=True)
def report_inventory(self) -> None:
    services.report_local_inventory(self.request.hostname or settings.HOST_NAME)
