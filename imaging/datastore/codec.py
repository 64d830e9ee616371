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
import re
import struct
import threading
from typing import Optional

import zstandard

from ..base.errors import ImageError, ImagingError

DEFAULT_LEVEL = 3
# A chunk's name: the SHA-256 of its raw bytes, in lowercase hex.
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
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
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RAW_BLOCK = 0


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    return bytes(length)


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    return hashlib.sha256(zeros(length)).hexdigest()


def is_zero(buf) -> bool:
    # A memcmp for any buffer: bytes == memoryview compares item by item, 80 times slower.
    return zeros(len(buf)).startswith(buf)


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


def raw_blocks(frame) -> Optional[list[memoryview]]:
    """The contents of a frame made of raw blocks only, as views into it; None for any other.

    zstd stores a block it cannot shrink as it is, so incompressible data
    (media, archives, encrypted files) needs copying out, not decoding. Read
    by the frame format (RFC 8878): magic number, frame header, then blocks of
    a 3-byte header (last-block bit, type, size) each. The frame's checksum is
    not checked here: whoever takes the views checks their SHA-256.
    """
    view = memoryview(frame)
    if len(view) < 6 or view[:4].tobytes() != ZSTD_MAGIC:
        return None
    descriptor = view[4]
    if descriptor & 0x0B:  # the reserved bit, or a dictionary's ID
        return None
    single_segment = descriptor >> 5 & 1
    position = 5 + (1 - single_segment) + (single_segment, 2, 4, 8)[descriptor >> 6]
    blocks = []
    last = False
    while not last:
        if position + 3 > len(view):
            return None
        header = int.from_bytes(view[position:position + 3], "little")
        last, kind, size = bool(header & 1), header >> 1 & 3, header >> 3
        position += 3
        if kind != RAW_BLOCK or position + size > len(view):
            return None
        blocks.append(view[position:position + size])
        position += size
    return blocks if position + 4 * (descriptor >> 2 & 1) == len(view) else None


def sha256_of(pieces) -> str:
    """The SHA-256 of consecutive pieces of memory."""
    hasher = hashlib.sha256()
    for piece in pieces:
        hasher.update(piece)
    return hasher.hexdigest()


class CorruptFrame(ImageError, zstandard.ZstdError):
    """A stored chunk zstd cannot decode.

    An ImageError, so it reaches the user as one line; still the ZstdError
    that code written against python-zstandard catches.
    """


def _decompressor(base: Optional[bytes]) -> zstandard.ZstdDecompressor:
    if base is not None:
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdDecompressor(dict_data=dictionary)
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _corrupt(digest: Optional[str], problem: str) -> CorruptFrame:
    return CorruptFrame(f"chunk {digest} is corrupt: {problem}" if digest else problem)


def decompress(frame: bytes, digest: Optional[str] = None, base: Optional[bytes] = None) -> bytes:
    """The raw bytes of one stored frame; CorruptFrame, naming chunk `digest`, if undecodable.

    `base`: the raw bytes of the base a delta frame names (see `delta_base`).
    """
    try:
        return _decompressor(base).decompress(
            frame if base is None else memoryview(frame)[DELTA_HEADER_SIZE:])
    except zstandard.ZstdError as exc:
        raise _corrupt(digest, f"undecodable zstd frame ({exc})") from None


def decompress_into(frame, out: memoryview, digest: Optional[str] = None,
                    base: Optional[bytes] = None) -> None:
    """Decode one stored frame into `out`, which its contents must fill exactly.

    Like `decompress`, without a fresh buffer for the contents. zstd checks
    the frame's checksum on reaching its end; CorruptFrame if undecodable or
    of another length.
    """
    source = memoryview(frame)[0 if base is None else DELTA_HEADER_SIZE:]
    filled = 0
    try:
        reader = _decompressor(base).stream_reader(source, read_across_frames=False)
        while filled < len(out) and (count := reader.readinto(out[filled:])):
            filled += count
        surplus = reader.read(1)
    except zstandard.ZstdError as exc:
        raise _corrupt(digest, f"undecodable zstd frame ({exc})") from None
    if filled != len(out) or surplus:
        raise _corrupt(digest, f"its frame does not hold {len(out)} bytes")


LEVELS = range(1, 23)


def check_level(level: int) -> int:
    """`level` itself if zstd has it; otherwise one clear error."""
    if level not in LEVELS:
        raise ImagingError(f"zstd level {level} does not exist: levels run from 1 to 22")
    return level
