"""Celery tasks: ids in, one engine call, services out. No rules here.

One task runs a job of any kind, through its entry in services/kinds.py. It claims the job
first (queued -> running, once), so a message delivered twice runs the job once; the engine
runs inside a JobRunner that beats the heartbeat, watches for cancel and sends progress.
"""
from __future__ import annotations

from celery import shared_task
from django.conf import settings

from imaging.base.errors import ImagingError
from imaging.base.progress import Progress

from . import services
from .runner import JobRunner
from .services.delivery import EARLIER_RUN_JOB, RUN_JOB


def _run_job(task, job_id: int) -> None:
    job = services.claim_job(job_id, task.request.hostname or settings.HOST_NAME)
    if job is None:
        return  # a duplicate delivery, or cancelled while it waited
    try:
        with JobRunner(job) as runner:
            result = services.registry.KINDS[job.kind].run(
                job, Progress(job.kind, 0, runner.progress, cancel=runner.cancel))
        services.finish_job(job, result)
    except ImagingError as exc:
        services.fail_job(job, exc)
    except Exception as exc:  # a bug: the job must not stay running; Celery logs the traceback
        services.fail_job(job, f"internal error: {type(exc).__name__}: {exc}")
        raise


run_job = shared_task(bind=True, name=RUN_JOB)(_run_job)
for _earlier in EARLIER_RUN_JOB:
    shared_task(bind=True, name=_earlier)(_run_job)


@shared_task
def run_schedule(schedule_id: int) -> None:
    services.run_schedule(schedule_id)


@shared_task(bind=True)
def report_inventory(self) -> None:
    services.report_local_inventory(self.request.hostname or settings.HOST_NAME)
