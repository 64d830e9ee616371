"""Notifications through Apprise: NOTIFY_URLS hear of every failure, overdue disk and stall;
a schedule's own URLs hear of its disk and jobs."""
from __future__ import annotations

import logging
import re
from typing import Iterable

import apprise
from django.conf import settings
from django.db import transaction

from ..models import Job

log = logging.getLogger(__name__)


def notify(title: str, body: str, urls: Iterable[str]) -> bool:
    """Send one message to Apprise URLs; a broken channel is logged, never raised."""
    urls = list(dict.fromkeys(url for url in urls if url))
    if not urls:
        return False
    channels = apprise.Apprise()
    for url in urls:
        if not channels.add(url):
            log.warning("not an Apprise URL Apprise understands: %s", _redacted(url))
    try:
        return bool(channels) and bool(channels.notify(title=title, body=body))
    except Exception:  # a notification plugin's bug must not fail the job it reports
        log.exception("notification %r failed", title)
        return False


def notify_later(title: str, body: str, urls: Iterable[str]) -> None:
    urls = list(urls)
    transaction.on_commit(lambda: notify(title, body, urls))


def notify_failure(job: Job, title: str) -> None:
    notify_later(f"{title} failed", f"{job.error}\n\n{job_summary(job)}", job_urls(job))


def job_urls(job: Job) -> list[str]:
    urls = list(settings.NOTIFY_URLS)
    if job.schedule_id:
        urls += job.schedule.notification_urls()
    return urls


def job_summary(job: Job) -> str:
    return f"Host {job.host.name}, worker {job.worker or 'none yet'}, state {job.state}."


def progress_text(job: Job) -> str:
    progress = job.progress or {}
    return f"{progress.get('phase') or job.kind}: {progress.get('done', 0)} of {progress.get('total', 0)} " \
           f"{progress.get('unit', 'bytes')}"


def _redacted(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)
