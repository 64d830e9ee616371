"""Restore: write an image to a disk or a file, then prove it by reading it back.

Safety checks decide before the target is opened for writing; block devices
are then opened with O_EXCL, which the kernel refuses while anything has them
mounted. Chunks are decompressed by a thread pool and written in place; a
regular-file target gets holes where the image has zero chunks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional

from . import codec
from .errors import ImageError, TargetError, describe
from .image import Image
from .pipeline import ordered_map
from .progress import Progress
from .safety import MOUNTINFO, check_target
from .syscalls import start_writeback


@dataclasses.dataclass
class RestoreResult:
    target: str
    size: int
    seconds: float
    verified: bool


def restore(image_dir: str, target: str, *, verify: bool = True,
            progress: Optional[Progress] = None, mounts_path: str = MOUNTINFO,
            workers: Optional[int] = None) -> RestoreResult:
    started = time.monotonic()
    image = Image.open(image_dir)
    index = image.index()
    missing = sorted({d for d in index if not image.store.chunk_path(d).exists()})
    if missing:
        raise ImageError(f"cannot restore {image.path}: {len(missing)} chunk(s) missing, "
                         f"first {missing[0]}")
    checked = check_target(target, image.size, mounts_path)
    progress = progress or Progress("restore", image.size)
    progress.start_phase("restore", image.size)

    fd = _open_target(checked.path, checked.is_block)
    try:
        if not checked.is_block:
            # Start from an empty file so every chunk not written stays a hole.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, image.size)
        _write_chunks(fd, image, index, checked.is_block, progress, workers)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise TargetError(f"cannot flush {target}: {describe(exc)}") from None
        if verify:
            progress.finish()
            progress.start_phase("verify", image.size)
            compare_target(target, image, index, progress, workers)
    finally:
        os.close(fd)
    progress.finish()
    return RestoreResult(target, image.size, round(time.monotonic() - started, 3), verify)


def _open_target(path: str, is_block: bool) -> int:
    flags = os.O_WRONLY | os.O_EXCL if is_block else os.O_RDWR | os.O_CREAT
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TargetError(f"cannot open target {path}: {describe(exc)}") from None


def _write_chunks(fd: int, image: Image, index: list[str], is_block: bool,
                  progress: Progress, workers: Optional[int]) -> None:
    """Decompress and write chunks in parallel; pwrite lets each worker write its own place."""
    def restore_chunk(position: int) -> None:
        digest, length = index[position], image.chunk_length(position)
        if codec.zero_digest(length) == digest and not is_block:
            return  # a hole
        data = codec.decompress(image.store.read_frame(digest))
        if len(data) != length:
            raise ImageError(f"chunk {digest} holds {len(data)} bytes, {length} expected")
        _pwrite_all(fd, data, position * image.chunk_size)
        start_writeback(fd, position * image.chunk_size, length)

    written = ordered_map(restore_chunk, range(len(index)), workers=workers,
                          cancelled=progress.cancelled, name="restore")
    with contextlib.closing(written):
        for position, _ in written:
            progress.advance(image.chunk_length(position))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise TargetError(f"cannot write the target at byte {offset}: {describe(exc)}") from None
        view = view[written:]
        offset += written


def compare_target(target: str, image: Image, index: list[str],
                   progress: Progress, workers: Optional[int]) -> None:
    """Re-read the target from the device, not the page cache, and compare chunk hashes."""
    read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)

    def digest_at(position: int) -> str:
        return codec.digest(os.pread(read_fd, image.chunk_length(position), position * image.chunk_size))

    try:
        os.posix_fadvise(read_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digests = ordered_map(digest_at, range(len(index)), workers=workers,
                              cancelled=progress.cancelled, name="compare")
        with contextlib.closing(digests):
            for position, digest in digests:
                length = image.chunk_length(position)
                if digest != index[position]:
                    start = position * image.chunk_size
                    raise TargetError(f"verification failed: {target} differs from the image "
                                      f"in chunk {position} (bytes {start}-{start + length - 1})")
                progress.advance(length)
    finally:
        os.close(read_fd)
