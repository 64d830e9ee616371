"""Chunk naming and zstd framing.

A chunk is named by the SHA-256 of its raw bytes and stored as one zstd frame
that records its content size and a checksum, so `zstd -dc` alone restores it.
All-zero chunks are recognised by comparison (a memcmp) instead of hashing.
hashlib and python-zstandard release the GIL on large buffers, which is what
lets a thread pool use every core.

A delta chunk is compressed with the raw bytes of another chunk, its base, as
a zstd raw-content dictionary: a night's changes to a chunk cost what the
changed blocks compress to, not the whole chunk. Its file starts with a zstd
skippable frame naming the base (zstd skips it), so every chunk file says how
to read it, and `zstd -dc -D <the base's raw bytes> <chunk>` restores it.
"""
from __future__ import annotations

import functools
import hashlib
import struct
import threading
from typing import Optional

import zstandard

from .errors import ImageError, ImagingError

DEFAULT_LEVEL = 3
_local = threading.local()
# A skippable frame (magic 0x184D2A50 + 0xE, then its length) holding the base's digest.
DELTA_MAGIC = struct.pack("<II", 0x184D2A5E, 32)
DELTA_HEADER_SIZE = len(DELTA_MAGIC) + 32
# The base precedes the chunk in the frame's window: both fit in 2^23 bytes for
# the default 4 MiB chunks. Larger match tables than level 3's own find the
# unchanged runs again after each changed block: on a night's changes to the
# benchmark disk, 10.6 MiB stored instead of 21.9 MiB, for 12 ms a chunk.
DELTA_TABLE_LOG = 20
# `zstd -D` refuses dictionaries over 32 MiB; datastores with larger chunks get no deltas.
MAX_BASE_SIZE = 32 * 1024 * 1024
# `zstd -D` takes a file starting with this as a trained dictionary, not raw content.
DICTIONARY_MAGIC = b"\x37\xa4\x30\xec"


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


def compress_delta(buf, base: bytes, base_digest: str, level: int = DEFAULT_LEVEL) -> bytes:
    """A delta frame of `buf` against `base`, the raw bytes of chunk `base_digest`."""
    window_log = max(len(base) + len(buf) - 1, 1).bit_length()
    own = zstandard.ZstdCompressionParameters.from_level(level, source_size=len(buf))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(buf), window_log=max(window_log, own.window_log),
        hash_log=max(own.hash_log, DELTA_TABLE_LOG), chain_log=max(own.chain_log, DELTA_TABLE_LOG),
        write_checksum=True, write_content_size=True)
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(compression_params=params, dict_data=dictionary)
    return DELTA_MAGIC + bytes.fromhex(base_digest) + compressor.compress(buf)


def usable_as_base(base: bytes, length: int) -> bool:
    """Whether stock `zstd -dc -D` restores a delta of `length` bytes against `base`."""
    return len(base) == length <= MAX_BASE_SIZE and base[:4] != DICTIONARY_MAGIC


def delta_base(frame: bytes) -> Optional[str]:
    """The digest of the base a stored frame needs, or None for a frame that stands alone."""
    if frame[:len(DELTA_MAGIC)] != DELTA_MAGIC or len(frame) < DELTA_HEADER_SIZE:
        return None
    return frame[len(DELTA_MAGIC):DELTA_HEADER_SIZE].hex()


class CorruptFrame(ImageError, zstandard.ZstdError):
    """A stored chunk zstd cannot decode.

    An ImageError, so it reaches the user as one line; still the ZstdError
    that code written against python-zstandard catches.
    """


def decompress(frame: bytes, digest: Optional[str] = None, base: Optional[bytes] = None) -> bytes:
    """The raw bytes of one stored frame; CorruptFrame, naming chunk `digest`, if undecodable.

    `base`: the raw bytes of the base a delta frame names (see `delta_base`).
    """
    try:
        if base is not None:
            dictionary = zstandard.ZstdCompressionDict(
                base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            return zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
                memoryview(frame)[DELTA_HEADER_SIZE:])
        decompressor = getattr(_local, "decompressor", None)
        if decompressor is None:
            decompressor = _local.decompressor = zstandard.ZstdDecompressor()
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
