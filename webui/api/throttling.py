"""The token endpoint's throttle, which believes only a history it could have written.

DRF keeps a client's recent request times in the cache, in Redis, where anyone able to write
can put anything under that key: what is not a list of times reads as no history, rather
than failing the request.
"""
from __future__ import annotations

from django.core.cache import cache
from rest_framework.throttling import ScopedRateThrottle


class RequestTimes:
    """The cache as the throttle reads and writes it."""

    def get(self, key: str, default: list[float]) -> list[float]:
        times = cache.get(key)
        if isinstance(times, list) and all(type(time) in (int, float) for time in times):
            return times
        return default

    def set(self, key: str, times: list[float], timeout: int) -> None:
        cache.set(key, times, timeout)


class LoginThrottle(ScopedRateThrottle):
    cache = RequestTimes()
