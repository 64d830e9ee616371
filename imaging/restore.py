"""Restore: write an image to a disk or a file, then prove it by reading it back.

Safety checks decide before the target is opened for writing; block devices
are then opened with O_EXCL, which the kernel refuses while anything has them
mounted. Chunks are decompressed by a thread pool and written in place; a
regular-file target gets holes where the image has zero chunks. The restore
is registered in the datastore as a reader of its image for its whole run, so
prune defers that image and garbage collection keeps its chunks.

One partition of an image can be restored alone, onto a partition-sized
target, with the same checks and a read-back comparison of its bytes. A
whole-disk restore onto a larger target is fitted to it afterwards (fit.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Collection, Iterable, Optional


from . import codec, fit, mount
from .chunks import decode, missing_chunks
from .errors import ImageError, ImagingError, TargetError, describe
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
    partition: Optional[int] = None  # the one partition restored, None for the whole disk
    relocated: bool = False  # the GPT backup header was moved to the end of a larger target
    grown_size: Optional[int] = None  # the last partition's new size, when grown

    def as_dict(self) -> dict:
        """The result; the partition, relocation and growth only when there was one."""
        found = dataclasses.asdict(self)
        return {key: value for key, value in found.items()
                if key not in _OPTIONAL or value not in (None, False)}


_OPTIONAL = ("partition", "relocated", "grown_size")


def restore(image_dir: os.PathLike | str, target: str, *, verify: bool = True,
            progress: Optional[Progress] = None,
            allowed_targets: Optional[Collection[str]] = None,
            workers: Optional[int] = None, partition: Optional[int] = None,
            grow: bool = False) -> RestoreResult:
    """Write the image to `target`, then (if `verify`) read it back and compare.

    `allowed_targets`: when given, the only disks or files the target may be;
    anything else is refused before it is opened. `partition`: write only that
    partition of the image. A target larger than a GPT image gets its backup
    header moved to its end, after the comparison; `grow` also grows the last
    partition and its ext2/3/4 filesystem to fill the target.
    """
    started = time.monotonic()
    progress = progress or Progress("restore", 0)
    if partition is not None:
        if grow:
            raise ImagingError("growing applies to a whole-disk restore, not to one partition")
        return _restore_partition(image_dir, target, partition, verify, progress,
                                  allowed_targets, workers, started)
    with reading(image_dir, "restore", progress, f" to {target}") as image:
        index = image.index()
        _refuse_missing_chunks(image, index, str(image.path))
        growth = fit.plan_growth(image) if grow else None
        checked = check_target(target, image.size, allowed_targets)
        progress.start_phase("restore", image.size)
        fd = _open_target(checked)
        try:
            if not checked.is_block:
                _empty_file(fd, checked, image.size)
            _write_chunks(fd, image, index, checked.is_block, progress, workers)
            _flush(fd, target)
            if verify:
                progress.start_phase("verify", image.size)
                compare_target(target, image, index, progress, workers)
        finally:
            os.close(fd)
        relocated = fit.relocate_backup_header(image, target, max(checked.size, image.size))
        grown_size = fit.grow(growth, target) if growth else None
    progress.finish()
    return RestoreResult(target, image.size, round(time.monotonic() - started, 3), verify,
                         relocated=relocated, grown_size=grown_size)


def _refuse_missing_chunks(image: Image, digests: Iterable[str], what: str) -> None:
    """Refused before the target is opened: a chunk (or a delta's base) is not stored."""
    missing = missing_chunks(image.store, digests)
    if missing:
        raise ImageError(f"cannot restore {what}: {len(missing)} chunk(s) missing, "
                         f"first {missing[0]}")


def _flush(fd: int, target: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise TargetError(f"cannot flush {target}: {describe(exc)}") from None


def _restore_partition(image_dir: os.PathLike | str, target: str, number: int, verify: bool,
                       progress: Progress, allowed_targets: Optional[Collection[str]],
                       workers: Optional[int], started: float) -> RestoreResult:
    """Write partition `number` of the image to a partition-sized target, then compare it."""
    with reading(image_dir, "restore", progress, f" partition {number} to {target}") as image:
        part = mount.partition(image, number)
        index = image.index()
        pieces = _pieces(image, part)
        _refuse_missing_chunks(image, (index[offset // image.chunk_size] for offset, _ in pieces),
                               f"partition {number} of {image.path}")
        checked = check_target(target, part.size, allowed_targets)
        progress.start_phase("restore", part.size)
        fd = _open_target(checked)
        try:
            if not checked.is_block:
                _empty_file(fd, checked, part.size)
            digests = _write_pieces(fd, image, index, part, pieces, checked.is_block, progress,
                                    workers)
            _flush(fd, target)
            if verify:
                progress.start_phase("verify", part.size)
                _compare_pieces(target, part, pieces, digests, progress, workers)
        finally:
            os.close(fd)
    progress.finish()
    return RestoreResult(target, part.size, round(time.monotonic() - started, 3), verify,
                         partition=number)


def _pieces(image: Image, part: mount.Partition) -> list[tuple[int, int]]:
    """The partition's bytes as (disk offset, length), cut where chunks end."""
    pieces = []
    offset = part.start
    while offset < part.end:
        chunk_end = (offset // image.chunk_size + 1) * image.chunk_size
        pieces.append((offset, min(chunk_end, part.end) - offset))
        offset += pieces[-1][1]
    return pieces


def _write_pieces(fd: int, image: Image, index: list[str], part: mount.Partition,
                  pieces: list[tuple[int, int]], is_block: bool, progress: Progress,
                  workers: Optional[int]) -> list[str]:
    """Write each piece at its place in the partition; the SHA-256 of each, in order."""
    def restore_piece(piece: tuple[int, int]) -> str:
        offset, length = piece
        position = offset // image.chunk_size
        digest = index[position]
        if codec.zero_digest(image.chunk_length(position)) == digest:
            if not is_block:
                return codec.zero_digest(length)  # a hole
            data = codec.zeros(length)
        else:
            within = offset - position * image.chunk_size
            chunk = decode(image.store, digest, image.store.read_frame(digest))
            if len(chunk) != image.chunk_length(position):
                raise ImageError(f"chunk {digest} holds {len(chunk)} bytes, "
                                 f"{image.chunk_length(position)} expected: run verify")
            data = chunk[within:within + length]
        _pwrite_all(fd, data, offset - part.start)
        start_writeback(fd, offset - part.start, length)
        return codec.digest(data)

    digests = []
    written = ordered_map(restore_piece, pieces, workers=workers, cancelled=progress.cancelled,
                          name="restore")
    with contextlib.closing(written):
        for (_, length), digest in written:
            digests.append(digest)
            progress.advance(length)
    return digests


def _compare_pieces(target: str, part: mount.Partition, pieces: list[tuple[int, int]],
                    digests: list[str], progress: Progress, workers: Optional[int]) -> None:
    """Re-read the partition from the target, not the page cache, and compare piece hashes."""
    spans = [(offset - part.start, length) for offset, length in pieces]
    read_back(target, spans, digests, progress, workers,
              lambda start, end: f"partition {part.number} of the image (bytes {start}-{end})")


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
        data = decode(image.store, digest, image.store.read_frame(digest))
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
    spans = [(position * image.chunk_size, image.chunk_length(position))
             for position in range(len(index))]
    read_back(target, spans, index, progress, workers,
              lambda start, end: f"the image in chunk {start // image.chunk_size} "
                                 f"(bytes {start}-{end})")


def read_back(target: str, spans: list[tuple[int, int]], expected: list[str], progress: Progress,
              workers: Optional[int], differs_from: Callable[[int, int], str]) -> None:
    """Hash each (offset, length) span of the target as the device returns it and compare
    with `expected`; a mismatch names what the span should hold, `differs_from(first, last)`."""
    try:
        read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot read back {target} to verify it: {describe(exc)}") from None

    def digest_of(number: int) -> str:
        offset, length = spans[number]
        try:
            return codec.digest(os.pread(read_fd, length, offset))
        except OSError as exc:
            raise TargetError(f"cannot read back {target} at byte {offset} to verify it: "
                              f"{describe(exc)}") from None

    try:
        with contextlib.suppress(OSError):  # a hint; without it the comparison still holds
            os.posix_fadvise(read_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digests = ordered_map(digest_of, range(len(spans)), workers=workers,
                              cancelled=progress.cancelled, name="compare")
        with contextlib.closing(digests):
            for number, digest in digests:
                offset, length = spans[number]
                if digest != expected[number]:
                    raise TargetError(f"verification failed: {target} differs from "
                                      f"{differs_from(offset, offset + length - 1)}")
                progress.advance(length)
    finally:
        os.close(read_fd)
