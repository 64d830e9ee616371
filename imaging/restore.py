"""Restore: write an image to a disk or a file, then prove it by reading it back.

Safety checks decide before the target is opened for writing; block devices
are then opened with O_EXCL, which the kernel refuses while anything has them
mounted. Chunks are decompressed by a thread pool and written in place; a
regular-file target gets holes where the image has zero chunks. The restore
is registered in the datastore as a reader of its image for its whole run, so
prune defers that image and garbage collection keeps its chunks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Collection, Optional


from . import codec
from .errors import ImageError, TargetError, describe
from .image import Image
from .pipeline import ordered_map
from .progress import Progress
from .safety import Target, check_target
from .store import reading
from .syscalls import start_writeback


@dataclasses.dataclass
class RestoreResult:
    target: str
    size: int
    seconds: float
    verified: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def restore(image_dir: os.PathLike | str, target: str, *, verify: bool = True,
            progress: Optional[Progress] = None,
            allowed_targets: Optional[Collection[str]] = None,
            workers: Optional[int] = None) -> RestoreResult:
    """Write the image to `target`, then (if `verify`) read it back and compare.

    `allowed_targets`: when given, the only disks or files the target may be;
    anything else is refused before it is opened.
    """
    started = time.monotonic()
    progress = progress or Progress("restore", 0)
    with reading(image_dir, "restore", progress, f" to {target}") as image:
        index = image.index()
        missing = sorted({d for d in index if not image.store.chunk_path(d).exists()})
        if missing:
            raise ImageError(f"cannot restore {image.path}: {len(missing)} chunk(s) missing, "
                             f"first {missing[0]}")
        checked = check_target(target, image.size, allowed_targets)
        progress.start_phase("restore", image.size)
        fd = _open_target(checked)
        try:
            if not checked.is_block:
                _empty_file(fd, checked, image.size)
            _write_chunks(fd, image, index, checked.is_block, progress, workers)
            try:
                os.fsync(fd)
            except OSError as exc:
                raise TargetError(f"cannot flush {target}: {describe(exc)}") from None
            if verify:
                progress.start_phase("verify", image.size)
                compare_target(target, image, index, progress, workers)
        finally:
            os.close(fd)
    progress.finish()
    return RestoreResult(target, image.size, round(time.monotonic() - started, 3), verify)


def _open_target(target: Target) -> int:
    flags = os.O_WRONLY | os.O_EXCL if target.is_block else os.O_RDWR | os.O_CREAT
    try:
        return os.open(target.path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TargetError(f"cannot open target {target.path}: {describe(exc)}") from None


def _empty_file(fd: int, target: Target, image_size: int) -> None:
    """Zero a file target, keeping its size if larger, so every chunk not written is a hole."""
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, max(image_size, target.size))
    except OSError as exc:
        raise TargetError(f"cannot empty the target file {target.path}: {describe(exc)}") from None


def _write_chunks(fd: int, image: Image, index: list[str], is_block: bool,
                  progress: Progress, workers: Optional[int]) -> None:
    """Decompress and write chunks in parallel; pwrite lets each worker write its own place."""
    def restore_chunk(position: int) -> None:
        digest, length = index[position], image.chunk_length(position)
        if codec.zero_digest(length) == digest and not is_block:
            return  # a hole
        data = codec.decompress(image.store.read_frame(digest), digest)
        if len(data) != length:
            raise ImageError(f"chunk {digest} holds {len(data)} bytes, {length} expected: "
                             "run verify")
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
    try:
        read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot read back {target} to verify it: {describe(exc)}") from None

    def digest_at(position: int) -> str:
        offset = position * image.chunk_size
        try:
            return codec.digest(os.pread(read_fd, image.chunk_length(position), offset))
        except OSError as exc:
            raise TargetError(f"cannot read back {target} at byte {offset} to verify it: "
                              f"{describe(exc)}") from None

    try:
        with contextlib.suppress(OSError):  # a hint; without it the comparison still holds
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
