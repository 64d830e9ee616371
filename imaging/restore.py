"""Restore: write an image, or one partition of it, to a disk or a file, then prove it.

Safety checks decide before the target is opened for writing; block devices
are then opened with O_EXCL, which the kernel refuses while anything has them
mounted. The restore is registered in the datastore as a reader of its image
for its whole run, so prune defers that image and garbage collection keeps its
chunks.

What is restored is a byte range of the disk: all of it, or one partition
(onto a partition-sized target), which may start and end anywhere inside a
chunk. One writer serves both: the range is cut where chunks end, and a
thread pool decompresses each piece's chunk and writes the piece in place.
Every whole 4096-byte block of the target goes with O_DIRECT where the target
takes it, since a restore passes over each byte once and the page cache only
costs it; the blocks a chunk boundary or the target's end cuts, and every
block of a target that refuses direct I/O, go through the page cache. A
regular-file target gets holes where the image has zero chunks. The read-back
hashes each piece as the device returns it (O_DIRECT again) and compares it
with its chunk's name, or, for part of a chunk, with the hash of that part of
a chunk whose name was checked when it was written. A whole-disk restore onto
a larger target is fitted to it afterwards (fit.py).
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

from . import fit
from .base.errors import ImageError, ImagingError, TargetError, describe
from .base.pipeline import ordered_map
from .base.progress import Progress
from .base.syscalls import pwrite_all, start_writeback
from .datastore.chunks import decode_into, missing_chunks
from .datastore.image import Image, reading
from .datastore.store import Datastore
from .reading import mount
from .safety import Target, check_target

# Direct I/O needs buffers, offsets and lengths aligned to the target's
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
    if partition is not None and grow:
        raise ImagingError("growing applies to a whole-disk restore, not to one partition")
    described = f" to {target}" if partition is None else f" partition {partition} to {target}"
    with reading(image_dir, "restore", progress, described) as image:
        extent = _Extent.of(image, partition)
        index = image.index()
        _refuse_missing_chunks(image, (index[piece.position] for piece in extent.pieces()),
                               extent.name())
        growth = fit.plan_growth(image) if grow else None
        checked = check_target(target, extent.size, allowed_targets)
        progress.start_phase("restore", extent.size)
        fd = _open_target(checked)
        try:
            if not checked.is_block:
                _empty_file(fd, checked, extent.size)
            expected = _write(fd, image, index, extent.pieces(), checked.is_block, progress,
                              workers)
            _flush(fd, target)
            if verify:
                progress.start_phase("verify", extent.size)
                _read_back(target, extent, expected, progress, workers)
        finally:
            os.close(fd)
        relocated = partition is None and fit.relocate_backup_header(
            image, target, max(checked.size, image.size))
        grown_size = fit.grow(growth, target) if growth else None
    progress.finish()
    return RestoreResult(target, extent.size, round(time.monotonic() - started, 3), verify,
                         partition=partition, relocated=relocated, grown_size=grown_size)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One chunk's share of what is restored: `length` bytes from `within` the chunk
    numbered `position`, written `at` that offset of the target."""

    position: int
    within: int
    length: int
    at: int


@dataclasses.dataclass(frozen=True)
class _Extent:
    """What a restore writes: the image's whole disk, or one partition of it."""

    image: Image
    partition: Optional[int]
    start: int
    size: int

    @classmethod
    def of(cls, image: Image, partition: Optional[int]) -> "_Extent":
        if partition is None:
            return cls(image, None, 0, image.size)
        part = mount.partition(image, partition)
        return cls(image, partition, part.start, part.size)

    def pieces(self) -> Iterator[_Piece]:
        """The extent's bytes in disk order, cut where chunks end."""
        offset, end = self.start, self.start + self.size
        while offset < end:
            position, within = divmod(offset, self.image.chunk_size)
            length = min(self.image.chunk_size - within, end - offset)
            yield _Piece(position, within, length, offset - self.start)
            offset += length

    def name(self) -> str:
        if self.partition is None:
            return str(self.image.path)
        return f"partition {self.partition} of {self.image.path}"

    def holding(self, first: int, last: int) -> str:
        """What the target's bytes `first` to `last` were to hold, for a mismatch."""
        if self.partition is None:
            return f"the image in chunk {first // self.image.chunk_size} (bytes {first}-{last})"
        return f"partition {self.partition} of the image (bytes {first}-{last})"


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


def _write(fd: int, image: Image, index: list[str], pieces: Iterable[_Piece], is_block: bool,
           progress: Progress, workers: Optional[int]) -> list[str]:
    """Decompress and write the pieces in parallel, each worker at its own place with pwrite;
    for each piece in order, the digest its read-back is to find."""
    writer = _Writer(fd, image.chunk_size)

    def restore_piece(piece: _Piece) -> str:
        digest, length = index[piece.position], image.chunk_length(piece.position)
        if image.store.zero_name(length) == digest and not is_block:
            return image.store.zero_name(piece.length)  # a hole
        return writer.write(image.store, digest, length, piece)

    expected = []
    written = ordered_map(restore_piece, pieces, workers=workers, cancelled=progress.cancelled,
                          name="restore")
    try:
        with contextlib.closing(written):
            for piece, digest in written:
                expected.append(digest)
                progress.advance(piece.length)
    finally:
        writer.close()
    return expected


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


class _Writer:
    """Pieces of chunks written in place: the target's whole 4096-byte blocks with O_DIRECT,
    past the page cache, and the blocks a chunk boundary or the target's end cuts through it.

    A restore writes each byte once, and its verification reads the target
    back from the device anyway: caching what it writes only costs. On a
    2-core VM, restoring 1 GiB into a fresh file took 0.8-3.2 s buffered (up
    to 3.6 s of it in the kernel, copying into new page-cache pages while the
    other thread spun on the file's lock), 0.8-1.2 s direct. Where the target
    refuses direct writes (ramfs, some FUSE and network filesystems), every
    block goes through the page cache.
    """

    def __init__(self, fd: int, chunk_size: int) -> None:
        self.fd = fd
        self._direct_fd = _reopened_direct(fd, os.O_WRONLY)
        self._refused = False
        # A block more than a chunk: the chunk is decoded `shift` bytes in (see `write`).
        self._buffers = _AlignedBuffers(chunk_size + DIRECT_ALIGNMENT)

    def write(self, store: Datastore, digest: str, length: int, piece: _Piece) -> str:
        """Decode the piece's chunk (`length` bytes named `digest`) and write the piece;
        the digest its read-back is to find."""
        frame = store.read_frame(digest)
        with self._buffers.lent() as buffer:
            # Each byte lands at an address equal to its place in the target, modulo
            # a block: the target's whole blocks then start at page-aligned addresses.
            shift = (piece.at - piece.within) % DIRECT_ALIGNMENT
            contents = memoryview(buffer)[shift:shift + length]
            decode_into(store, digest, frame, contents)
            data = contents[piece.within:piece.within + piece.length]
            if piece.length == length:
                self._write(data, piece.at)
                return digest
            # Part of a chunk: its name is checked here, so that the read-back of
            # the part proves the image's bytes as a whole chunk's read-back does.
            if store.name(contents) != digest:
                raise ImageError(f"chunk {digest} is corrupt (content does not match its name)")
            self._write(data, piece.at)
            return store.name(data)

    def _write(self, data: memoryview, at: int) -> None:
        head = min(-at % DIRECT_ALIGNMENT, len(data))
        blocks = (len(data) - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        direct = self._write_direct(data[head:head + blocks], at + head) if blocks else 0
        if direct:
            _write_buffered(self.fd, data[:head], at)
            _write_buffered(self.fd, data[head + direct:], at + head + direct)
        else:
            _write_buffered(self.fd, data, at)

    def _write_direct(self, blocks: memoryview, at: int) -> int:
        """How many bytes of `blocks` went past the page cache: none where the target refuses."""
        if self._direct_fd is None or self._refused:
            return 0
        try:
            return os.pwrite(self._direct_fd, blocks, at)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise TargetError(f"cannot write the target at byte {at}: "
                                  f"{describe(exc)}") from None
            self._refused = True
            return 0

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)


def _write_buffered(fd: int, data: memoryview, at: int) -> None:
    if not data:
        return
    try:
        pwrite_all(fd, [data], at)
    except OSError as exc:
        raise TargetError(f"cannot write the target at byte {at}: {describe(exc)}") from None
    start_writeback(fd, at, len(data))


class _DirectReader:
    """The target read back with O_DIRECT: from the device itself, into reused buffers.

    A span is read as the whole blocks that hold it. Reading a freshly written
    gigabyte through the page cache filled new pages with it (1.1-2.2 s of
    kernel time on the VM above); dropping the cache first was only a hint
    besides.
    """

    def __init__(self, fd: int, largest: int, name: Callable[[bytes], str]) -> None:
        self.fd = fd
        self._buffers = _AlignedBuffers(largest + DIRECT_ALIGNMENT)
        self._refused = False
        self._name = name

    @classmethod
    def open(cls, fd: int, largest: int,
             name: Callable[[bytes], str]) -> Optional["_DirectReader"]:
        """A reader of spans up to `largest` bytes, hashing them with `name` (the datastore's
        chunk names'), or None if the target takes no direct I/O."""
        direct_fd = _reopened_direct(fd, os.O_RDONLY)
        return None if direct_fd is None else cls(direct_fd, largest, name)

    def digest(self, offset: int, length: int) -> Optional[str]:
        """The digest of `length` bytes at `offset`; None if the caller is to read them itself."""
        if self._refused:
            return None
        first = offset - offset % DIRECT_ALIGNMENT
        end = -(-(offset + length) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        with self._buffers.lent() as buffer:
            view = memoryview(buffer)[:end - first]
            filled = 0
            while filled < len(view):
                try:
                    count = os.preadv(self.fd, [view[filled:]], first + filled)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or filled:
                        raise
                    self._refused = True
                    return None
                if not count:
                    break  # the target ends here: the digest then differs
                filled += count
            return self._name(view[offset - first:min(filled, offset - first + length)])

    def close(self) -> None:
        os.close(self.fd)


def _read_back(target: str, extent: _Extent, expected: list[str], progress: Progress,
               workers: Optional[int]) -> None:
    """Hash each piece of the extent as the target's device returns it and compare it with
    `expected`; a mismatch names what the piece was to hold."""
    try:
        read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot read back {target} to verify it: {describe(exc)}") from None
    name = extent.image.store.name  # what each piece's expected digest is too
    direct = _DirectReader.open(read_fd, extent.image.chunk_size, name)

    def digest_of(piece: _Piece) -> str:
        try:
            if direct is not None and (found := direct.digest(piece.at, piece.length)) is not None:
                return found
            return name(os.pread(read_fd, piece.length, piece.at))
        except OSError as exc:
            raise TargetError(f"cannot read back {target} at byte {piece.at} to verify it: "
                              f"{describe(exc)}") from None

    try:
        with contextlib.suppress(OSError):  # a hint; without it the comparison still holds
            os.posix_fadvise(read_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digests = ordered_map(digest_of, extent.pieces(), workers=workers,
                              cancelled=progress.cancelled, name="compare")
        with contextlib.closing(digests):
            for (piece, digest), wanted in zip(digests, expected):
                if digest != wanted:
                    raise TargetError(f"verification failed: {target} differs from "
                                      f"{extent.holding(piece.at, piece.at + piece.length - 1)}")
                progress.advance(piece.length)
    finally:
        os.close(read_fd)
        if direct is not None:
            direct.close()
