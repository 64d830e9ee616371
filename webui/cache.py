"""What Django's cache keeps in Redis: JSON, which reading can never turn into code.

Django's RedisCache pickles what it stores and unpickles what it reads, so anyone able to
write to Redis would run code in every process that reads the cache (the web server runs as
root). JSON holds only data; what it does not decode (someone else's bytes) reads as None.
"""
from __future__ import annotations

import json


class JSONSerializer:
    """RedisCache's `serializer`: an integer is stored as its digits, which INCR takes."""

    def dumps(self, value) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def loads(self, data: bytes):
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            return None
