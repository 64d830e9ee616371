"""Job messages: sent once the job's row is committed, sent again if Redis lost them.

A job is its row; its message on the host's queue (Redis, through Celery) only
tells a worker to run it, and claim_job runs it once however often the message
comes. So a job whose message cannot be sent is failed at once, freeing its
disk, and its request answered as Unavailable; and a queued job whose message
is nowhere in Redis any more (Redis restarted without its data) is sent again.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from typing import Any, Iterable, Optional

import kombu.exceptions
import redis
from django.db import transaction
from django.utils import timezone

from ..celery import app
from ..models import Job
from .errors import Unavailable
from .jobs import announce
from .running import fail_job

log = logging.getLogger(__name__)

# Redis down (kombu's OperationalError, once its retries are spent) or refusing a write
# (redis' ResponseError: out of memory, cannot persist).
BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError)
# A job's message is in Redis moments after its row is committed: one missing this long
# after was lost.
LOST_AFTER = dt.timedelta(seconds=60)
# The worker's task that runs a job of any kind (webui/tasks.py), by its name: the web sends
# it without loading the worker's code.
RUN_JOB = "webui.tasks.run_job"
# What it was called when each kind had a task of its own: a message sent then may still
# wait in a queue after an upgrade, and is run all the same.
EARLIER_RUN_JOB = tuple(f"webui.tasks.run_{kind}" for kind in (
    "backup", "restore", "verify", "recompress", "export", "import", "prune", "gc"))


def enqueue(job: Job) -> None:
    """Send the new job's message once its row is committed, so the worker finds the row; a
    job that cannot be sent is failed then, and Unavailable raised where the transaction
    commits (outside any, for every caller)."""
    transaction.on_commit(lambda: send(job))
    announce(job)


def send(job: Job) -> None:
    """Put the job's message on its host's queue; a job that cannot be sent fails, and
    Unavailable says so."""
    try:
        _publish(job)
    except BROKER_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        fail_job(job, f"not started: the job queue (Redis) did not take it: {reason}")
        raise Unavailable(f"job #{job.pk} was not started: the job queue (Redis) did not take "
                          f"it ({reason}); try again once Redis is back") from None


def resend_lost_jobs(now: Optional[dt.datetime] = None) -> int:
    """Send again the queued jobs whose message is neither waiting in their host's queue nor
    delivered to a worker; returns how many. A job sent twice still runs once."""
    now = now or timezone.now()
    queued = list(Job.objects.filter(state=Job.State.QUEUED, created__lt=now - LOST_AFTER)
                  .select_related("host"))
    if not queued:
        return 0
    in_redis = _jobs_in_redis({job.host.queue for job in queued})
    lost = [job for job in queued if job.pk not in in_redis]
    for job in lost:
        log.warning("job #%s is queued but its message is gone from Redis (restarted without "
                    "its data?): sent again", job.pk)
        _publish(job)
    return len(lost)


def _publish(job: Job) -> None:
    app.send_task(RUN_JOB, args=[job.pk], queue=job.host.queue)


def _jobs_in_redis(queues: Iterable[str]) -> set[int]:
    """The jobs whose message waits in one of `queues` or was delivered to a worker that has
    not acknowledged it yet, as kombu keeps them in Redis: a list per queue, and a hash of
    the unacknowledged ones."""
    queues = sorted(queues)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        with channel.client.pipeline() as reads:  # MULTI/EXEC: one moment's view
            for queue in queues:
                reads.lrange(queue, 0, -1)
            reads.hvals(channel.unacked_key)
            *waiting, delivered = reads.execute()
    messages = [json.loads(raw) for queue in waiting for raw in queue]
    messages += [json.loads(raw)[0] for raw in delivered]  # [message, exchange, routing key]
    job_tasks = {RUN_JOB, *EARLIER_RUN_JOB}
    return {job_id for job_id in (_job_of(message, job_tasks) for message in messages)
            if job_id is not None}


def _job_of(message: dict[str, Any], job_tasks: set[str]) -> Optional[int]:
    """The job a Celery message (protocol 2: a body of [args, kwargs, embed]) runs, if any."""
    if message.get("headers", {}).get("task") not in job_tasks:
        return None
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return args[0] if args and isinstance(args[0], int) else None
