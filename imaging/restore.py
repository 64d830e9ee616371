"""Restore: write an image to a disk or a file, then prove it by reading it back.

Safety checks decide before the target is opened for writing; block devices
are then opened with O_EXCL, which the kernel refuses while anything has them
mounted. Chunks are decompressed by a thread pool and written in place; a
regular-file target gets holes where the image has zero chunks. Whole chunks
are written, and read back for the verification, with O_DIRECT where the
target takes it: a restore passes over each byte once, so the page cache only
costs it, and the read-back then comes from the device itself. The restore
is registered in the datastore as a reader of its image for its whole run, so
prune defers that image and garbage collection keeps its chunks.

One partition of an image can be restored alone, onto a partition-sized
target, with the same checks and a read-back comparison of its bytes. A
whole-disk restore onto a larger target is fitted to it afterwards (fit.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import queue
import time
from typing import Callable, Collection, Iterable, Iterator, Optional

from . import codec, fit, mount
from .chunks import decode, decode_into, missing_chunks
from .errors import ImageError, ImagingError, TargetError, describe
from .image import Image
from .pipeline import ordered_map
from .progress import Progress
from .safety import Target, check_target
from .store import Datastore, reading
from .syscalls import start_writeback

# Direct writes need buffers, offsets and lengths aligned to the target's
# logical block size: 4096 covers 512-byte and 4 KiB-sector disks alike.
DIRECT_ALIGNMENT = 4096


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
    direct = _DirectWriter.open(fd, image.chunk_size)

    def restore_chunk(position: int) -> None:
        digest, length = index[position], image.chunk_length(position)
        if codec.zero_digest(length) == digest and not is_block:
            return  # a hole
        offset = position * image.chunk_size
        frame = image.store.read_frame(digest)
        if direct is not None and direct.write(image.store, digest, frame, offset, length, fd):
            return
        data = decode(image.store, digest, frame)
        if len(data) != length:
            raise ImageError(f"chunk {digest} holds {len(data)} bytes, {length} expected: "
                             "run verify")
        _pwrite_all(fd, data, offset)
        start_writeback(fd, offset, length)

    written = ordered_map(restore_chunk, range(len(index)), workers=workers,
                          cancelled=progress.cancelled, name="restore")
    try:
        with contextlib.closing(written):
            for position, _ in written:
                progress.advance(image.chunk_length(position))
    finally:
        if direct is not None:
            direct.close()


class _AlignedBuffers:
    """Page-aligned buffers (direct I/O needs them), reused from one chunk to the next."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._spare: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()

    @contextlib.contextmanager
    def lent(self) -> Iterator[mmap.mmap]:
        try:
            buffer = self._spare.get_nowait()
        except queue.Empty:
            buffer = mmap.mmap(-1, self._size)  # freed with the last view of it
        try:
            yield buffer
        finally:
            self._spare.put(buffer)


def _reopened_direct(fd: int, flags: int) -> Optional[int]:
    """The file open as `fd` opened again with O_DIRECT, or None if it takes no direct I/O.

    Reopened through /proc, so it is the very file the safety checks passed,
    whatever its path names by now.
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


class _DirectWriter:
    """Whole chunks written with O_DIRECT, past the page cache.

    A restore writes each byte once, and its verification reads the target
    back from the device anyway: caching what it writes only costs. On a
    2-core VM, restoring 1 GiB into a fresh file took 0.8-3.2 s buffered (up
    to 3.6 s of it in the kernel, copying into new page-cache pages while the
    other thread spun on the file's lock), 0.8-1.2 s direct. Where the target
    refuses direct writes (tmpfs, some FUSE and network filesystems), or for
    a length or offset it cannot align, the caller writes buffered.
    """

    def __init__(self, fd: int, chunk_size: int) -> None:
        self.fd = fd
        self._buffers = _AlignedBuffers(chunk_size)
        self._refused = False

    @classmethod
    def open(cls, fd: int, chunk_size: int) -> Optional["_DirectWriter"]:
        """A writer to the file open as `fd`, or None if it takes no direct writes."""
        direct_fd = None if chunk_size % DIRECT_ALIGNMENT else _reopened_direct(fd, os.O_WRONLY)
        return None if direct_fd is None else cls(direct_fd, chunk_size)

    def write(self, store: Datastore, digest: str, frame: bytes, offset: int, length: int,
              buffered_fd: int) -> bool:
        """Decode one chunk and write it; False if the caller is to write it buffered."""
        if self._refused or length % DIRECT_ALIGNMENT or offset % DIRECT_ALIGNMENT:
            return False
        with self._buffers.lent() as buffer:
            contents = memoryview(buffer)[:length]
            decode_into(store, digest, frame, contents)
            try:
                written = os.pwrite(self.fd, contents, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise TargetError(f"cannot write the target at byte {offset}: "
                                      f"{describe(exc)}") from None
                self._refused = True
                return False
            if written < length:
                _pwrite_all(buffered_fd, contents[written:], offset + written)
            return True

    def close(self) -> None:
        os.close(self.fd)


class _DirectReader:
    """The target read back with O_DIRECT: from the device itself, into reused buffers.

    Reading a freshly written gigabyte through the page cache filled new
    pages with it (1.1-2.2 s of kernel time on the VM above); dropping the
    cache first was only a hint besides.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffers: dict[int, _AlignedBuffers] = {}
        self._refused = False

    @classmethod
    def open(cls, fd: int) -> Optional["_DirectReader"]:
        direct_fd = _reopened_direct(fd, os.O_RDONLY)
        return None if direct_fd is None else cls(direct_fd)

    def digest(self, offset: int, length: int) -> Optional[str]:
        """The digest of `length` bytes at `offset`; None if the caller is to read them itself."""
        if self._refused or length % DIRECT_ALIGNMENT or offset % DIRECT_ALIGNMENT:
            return None
        buffers = self._buffers.setdefault(length, _AlignedBuffers(length))
        with buffers.lent() as buffer:
            view = memoryview(buffer)
            filled = 0
            while filled < length:
                try:
                    count = os.preadv(self.fd, [view[filled:]], offset + filled)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or filled:
                        raise
                    self._refused = True
                    return None
                if not count:
                    break  # the target ends here: the digest then differs
                filled += count
            return codec.digest(view[:filled])

    def close(self) -> None:
        os.close(self.fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
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
    direct = _DirectReader.open(read_fd)

    def digest_of(number: int) -> str:
        offset, length = spans[number]
        try:
            if direct is not None and (found := direct.digest(offset, length)) is not None:
                return found
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
        if direct is not None:
            direct.close()
