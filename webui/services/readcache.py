"""Reads answered again from the cache while the rows they come from stand unchanged.

The API's lists, and who an API token belongs to, for reads. A cached answer
names the models it is made of. Every write to one of those models (a save or a
delete, through Django's signals; a queryset update or bulk_create, through
models.rows_changed) gives that model a new version in the cache, which every
web process and worker share; an entry is stored with the versions it was
computed at, and answers only while they are still the current ones, so the
first read after a write computes the answer afresh.

Whoever can write to Redis can put anything there. The cache holds JSON only
(webui.cache), and each entry is signed with a key derived from SECRET_KEY, bound
to the key it is stored under and stamped with when it was made: an entry
forged, altered, copied from another key or older than API_CACHE_SECONDS is not
believed but computed afresh. Versions are data compared for equality: a forged
one makes entries miss, or at most lets an entry younger than API_CACHE_SECONDS
answer again, as a write that bypasses the signals would.

A write bumps at once and again once its transaction commits: a reader in
between may store what it read before the commit with the first bump's
versions, and the second bump makes that entry answer nobody.

What a list shows can also change with the clock alone (a disk turns overdue):
an entry lives API_CACHE_SECONDS at most, which bounds how far behind the clock
an answer can be, and how long a write that bypasses the ORM and its signals
(raw SQL, a restored database, a queryset update of users) can go unseen. Keys
are namespaced by the database, so deployments or test runs sharing one Redis
never read each other's answers. A cache that does not answer is skipped: the
answer is computed, and the failure logged once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from typing import TypeVar

from django.conf import settings
from django.core import signing
from django.core.cache import BaseCache, caches
from django.core.signals import setting_changed
from django.db import connection, models, transaction
from django.dispatch import receiver
from redis import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Health:
    failing = False


@functools.cache
def shared_cache() -> BaseCache:
    """The cache (Redis) every web process and worker share, one client per process."""
    # One per process, its connections pooled: django.core.cache.cache is one per thread, and
    # under ASGI each request has a thread of its own, so it would connect to Redis (and shake
    # hands) for every request anew, which cost more than the rest of a cached answer.
    return caches.create_connection("default")


@receiver(setting_changed)
def _settings_changed(setting, **kwargs) -> None:
    if setting == "CACHES":
        shared_cache.cache_clear()


def cached(name: str, made_of: Iterable[type[models.Model]], compute: Callable[[], T]) -> T:
    """The answer `name` (what identifies it: a list's URL...) as compute() last returned it
    with the rows of `made_of` as they are now; compute() is called on a miss (what it
    raises is not cached) and returns what JSON holds."""
    if not settings.API_CACHE_SECONDS:
        return compute()
    key = _entry_key(name)
    version_keys = [_version_key(model._meta.label_lower) for model in made_of]
    try:
        # One round trip: the entry and the versions it must have been stored under.
        found = shared_cache().get_many([key, *version_keys])
        versions = [found.get(version_key) or _new_version(version_key)
                    for version_key in version_keys]
    except RedisError as exc:
        _failed(exc)
        return compute()
    stored = _verified(key, found.get(key))
    if stored is not None and stored[0] == versions:
        return stored[1]
    value = compute()
    try:
        # Under the versions read before computing: if a write came in between, the entry
        # answers nobody, and the next read computes the list again.
        shared_cache().set(key, _signer(key).sign(json.dumps([versions, value])),
                     settings.API_CACHE_SECONDS)
    except RedisError as exc:
        _failed(exc)
    else:
        _answered()
    return value


def changed(model: type[models.Model]) -> None:
    """Rows of `model` were written: no list stored before shows them."""
    label = model._meta.label_lower
    _bump(label)
    if connection.in_atomic_block:
        transaction.on_commit(lambda: _bump(label))


def forget_all(made_of: Iterable[type[models.Model]]) -> None:
    """As if every model of `made_of` had changed (after writes no signal told of)."""
    for model in made_of:
        _bump(model._meta.label_lower)


def _verified(key: str, stored) -> list | None:
    """[versions, value] of the entry stored under `key`, if this deployment signed it there
    less than API_CACHE_SECONDS ago (the signature's clock counts whole seconds)."""
    if not isinstance(stored, str):
        return None
    try:
        return json.loads(_signer(key).unsign(stored, max_age=settings.API_CACHE_SECONDS + 1))
    except signing.BadSignature:
        return None


def _signer(key: str) -> signing.TimestampSigner:
    # The JSON is signed as it is: signing.dumps would also base64 it, which doubled the
    # time a 10 KB list's hit spends decoding.
    return signing.TimestampSigner(salt=f"webui.services.readcache:{key}")


def _new_version(version_key: str) -> str:
    # Never written, evicted, or holding what is not JSON: a new random version, so that no
    # entry stored under an earlier one can answer.
    cache = shared_cache()
    cache.add(version_key, secrets.token_hex(8), timeout=None)
    version = cache.get(version_key)
    if version is None:
        version = secrets.token_hex(8)
        cache.set(version_key, version, timeout=None)
    return version


def _bump(label: str) -> None:
    try:
        shared_cache().set(_version_key(label), secrets.token_hex(8), timeout=None)
    except RedisError as exc:
        # The write stands; lists may show the old rows for up to API_CACHE_SECONDS.
        _failed(exc)


def _namespace() -> str:
    database = connection.settings_dict
    return _namespace_of(database["ENGINE"], str(database["NAME"]))


@functools.lru_cache(maxsize=16)
def _namespace_of(engine: str, name: str) -> str:
    # The database's engine and name, not its host: hosts may reach one server by different
    # names, and a worker's writes must reach the web server's lists all the same.
    if engine == "django.db.backends.sqlite3":
        name = os.path.realpath(name)
    return hashlib.sha256(f"{engine}\0{name}".encode()).hexdigest()[:16]


def _version_key(label: str) -> str:
    return f"readcache:{_namespace()}:version:{label}"


def _entry_key(name: str) -> str:
    return f"readcache:{_namespace()}:entry:{hashlib.sha256(name.encode()).hexdigest()}"


def _failed(exc: Exception) -> None:
    if not _Health.failing:
        log.warning("the cache does not answer (%s: %s): reads are computed for every request",
                    type(exc).__name__, exc)
    _Health.failing = True


def _answered() -> None:
    if _Health.failing:
        log.info("the cache answers again")
    _Health.failing = False
