"""Chunk naming and zstd framing.

A chunk is named by the SHA-256 of its raw bytes and stored as one zstd frame
that records its content size and a checksum, so `zstd -dc` alone restores it.
All-zero chunks are recognised by comparison (a memcmp) instead of hashing.
hashlib and python-zstandard release the GIL on large buffers, which is what
lets a thread pool use every core.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from typing import Optional

import zstandard

from .errors import ImageError, ImagingError

DEFAULT_LEVEL = 3
_local = threading.local()


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    return bytes(length)


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    return hashlib.sha256(zeros(length)).hexdigest()


def is_zero(buf) -> bool:
    return buf == zeros(len(buf))


def digest(buf) -> str:
    if is_zero(buf):
        return zero_digest(len(buf))
    return hashlib.sha256(buf).hexdigest()


def compress(buf, level: int = DEFAULT_LEVEL) -> bytes:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    compressor = cache.get(level)
    if compressor is None:
        compressor = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=True)
    return compressor.compress(buf)


class CorruptFrame(ImageError, zstandard.ZstdError):
    """A stored chunk zstd cannot decode.

    An ImageError, so it reaches the user as one line; still the ZstdError
    that code written against python-zstandard catches.
    """


def decompress(frame: bytes, digest: Optional[str] = None) -> bytes:
    """The raw bytes of one stored frame; CorruptFrame, naming chunk `digest`, if undecodable."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        return decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        problem = f"undecodable zstd frame ({exc})"
        raise CorruptFrame(f"chunk {digest} is corrupt: {problem}" if digest else problem) from None


LEVELS = range(1, 23)


def check_level(level: int) -> int:
    """`level` itself if zstd has it; otherwise one clear error."""
    if level not in LEVELS:
        raise ImagingError(f"zstd level {level} does not exist: levels run from 1 to 22")
    return level
