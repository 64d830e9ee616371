"""A running boot test's screen as the worker last saw it, for the job's page: kept in the
cache every web process and worker share, until the job ends (or KEPT_SECONDS pass).

Whoever can write to Redis can put a picture there: it is only ever served back as a
PNG, to people who may see the job."""
from __future__ import annotations

import base64
import binascii
import logging
from typing import Optional

from redis import RedisError

from ..models import Job
from .readcache import shared_cache

log = logging.getLogger(__name__)
KEPT_SECONDS = 3600


def _key(job: Job) -> str:
    return f"boot-screen:{job.pk}"


def show(job: Job, picture: bytes) -> None:
    """The job's screen is now `picture` (PNG); a cache away costs the page its live view."""
    try:
        shared_cache().set(_key(job), base64.b64encode(picture).decode(), KEPT_SECONDS)
    except RedisError as exc:
        log.warning("boot test #%s: its screen not shared: %s", job.pk, exc)


def screen(job: Job) -> Optional[bytes]:
    """The job's screen as last shown, None if none is (or the cache is away)."""
    try:
        kept = shared_cache().get(_key(job))
    except RedisError:
        return None
    try:
        return base64.b64decode(kept, validate=True) if isinstance(kept, str) else None
    except binascii.Error:
        return None


def forget(job: Job) -> None:
    try:
        shared_cache().delete(_key(job))
    except RedisError as exc:
        log.warning("boot test #%s: its screen left in the cache: %s", job.pk, exc)
