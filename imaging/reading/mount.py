"""An image as a read-only disk: random access to its bytes, and a FUSE mount of it.

`ImageReader` serves any byte range of an image, decompressing (and checking)
only the chunks the range touches and keeping the last few in a small LRU
cache; it counts the chunk bytes it decompressed, which is how a caller shows
that reading one file read only that file's chunks.

`mount` exposes an image through libfuse 3 (the mfusepy binding) as
DIR/disk and one file per partition of its layout.sf, DIR/p1, DIR/p2, ..., and one
per linear LVM logical volume, its segments joined in order, named as /dev/mapper
names it (DIR/vg0-root), read from the PV's own metadata (disks/lvm.py). Nothing can
write through it: it is mounted read-only and an open for writing
is refused with EROFS. It serves until `umount DIR` (or `fusermount3 -u DIR`),
Ctrl-C or SIGTERM, registered in the datastore as a reader of its image all
along, so prune defers the image and garbage collection keeps its chunks.

`exposed` makes the same mount in a private temporary directory for the length
of a `with` block: how files, extract and verify --fsck hand a partition to the
filesystems' own tools.
A process killed while it serves one cannot unmount it: the next private mount
made on the machine undoes it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import re
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from ..base import tools
from ..base.errors import ImageError, ImagingError, describe
from ..base.progress import Progress
from ..base.syscalls import ignore_signal
from ..datastore import codec
from ..datastore.chunks import Contents, read_chunk, read_chunk_into
from ..datastore.image import Image, parse_stamp, reading, reads_image
from ..disks import layout, lvm
from ..disks.mounts import read_mounts

# Decompressed chunks kept for reads that come back to them (4 MiB each by default).
CACHE_CHUNKS = 8
# Chunks loaded ahead of a caller that said which it reads next (ImageReader.read_ahead):
# a few, so that the cache keeps the chunk being read and those after it.
READ_AHEAD = 3
# Buffers for chunks lent to copies (ImageReader.lent): one for each thread that copies.
LOANS = 8
# How long a private mount may take to come up before it counts as failed.
MOUNT_TIMEOUT = 30.0
# How often a mount looks at its registration's heartbeat and at cancel.
WATCH_INTERVAL = 1.0
FUSE_DEVICE = Path("/dev/fuse")
PRIVATE_MOUNT_PREFIX = "imaging-mount-"
# What the mount table shows as the source of every mount of an image: imaging:DISK/STAMP.
FSNAME_PREFIX = "imaging:"
FUSE_PACKAGE = "fuse3"
_LABEL_RE = re.compile(r"^label:\s*(\S+)", re.MULTILINE)
_NUMBER_RE = re.compile(r"(\d+)$")
Numbered = TypeVar("Numbered")


@dataclasses.dataclass(frozen=True)
class Partition:
    """A partition of an image's layout, in bytes."""

    number: int  # of a logical volume: of the partition holding it
    start: int
    size: int
    type: Optional[str] = None  # the partition type sfdisk printed (MBR id or GPT GUID)
    volume: Optional[str] = None  # "vg0/root": an LVM logical volume inside partition `number`
    # (bytes from the disk's start, length) of each piece of a volume in several, in order
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def name(self) -> str:
        """Its file in the image's view: p1, or vg0-root."""
        return lvm.file_name(self.volume) if self.volume else f"p{self.number}"

    @property
    def shown(self) -> str:
        """How messages name it: partition 1, or volume vg0/root."""
        return lvm.place(self.number, self.volume)

    @property
    def end(self) -> int:
        return self.start + self.size

    def spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(bytes from the disk's start, length) of its bytes offset..offset+length, up to
        its end."""
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset}")
        found, base, end = [], 0, min(offset + length, self.size)
        for start, size in self.pieces or ((self.start, self.size),):
            low, high = max(offset, base), min(end, base + size)
            if high > low:
                found.append((start + low - base, high - low))
            base += size
        return found

    def read(self, reader: "ImageReader", offset: int, length: int) -> bytes:
        """Its bytes offset..offset+length, up to its end, from the image."""
        return b"".join(reader.pread(start, size) for start, size in self.spans(offset, length))


def layout_text(image: Image) -> Optional[str]:
    """The image's layout.sf, None if the disk had no partition table."""
    path = image.path / layout.LAYOUT_NAME
    try:
        return image.read_file(layout.LAYOUT_NAME).decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problem = describe(exc) if isinstance(exc, OSError) else "not text"
        raise ImageError(f"{path}: unreadable partition table ({problem})") from None


def label(image: Image) -> Optional[str]:
    """"dos" or "gpt" (what sfdisk calls the table), None without a partition table."""
    text = layout_text(image)
    found = _LABEL_RE.search(text) if text else None
    return found.group(1) if found else None


def partitions(image: Image) -> list[Partition]:
    """The partitions of the image's layout.sf that lie within the image, by number."""
    text = layout_text(image)
    if text is None:
        return []
    found = []
    for entry in layout.parse_dump(text, image.manifest.sector_size):
        number = _NUMBER_RE.search(entry["name"])
        if number is None or entry["size"] <= 0 or entry["start"] + entry["size"] > image.size:
            continue  # not a partition this image holds whole
        found.append(Partition(int(number.group(1)), entry["start"], entry["size"], entry["type"]))
    return sorted(found, key=lambda part: part.number)


def partition(image: Image, number: int) -> Partition:
    """Partition `number` of the image; ImageError naming those it has if there is none."""
    return numbered(partitions(image), number, str(image.path))


def volumes(parts: Sequence[Partition], reader: "ImageReader", *, strict: bool = False
            ) -> list[Partition]:
    """The linear LVM logical volumes (their segments all on one PV) of the image's PV
    partitions, read from the PVs' own metadata. A PV whose metadata does not add up holds
    none here; so does one whose chunks cannot be read (its readers say why), unless
    `strict`, which raises that."""
    found = []
    for part in parts:
        try:  # most partitions are no PV: read_pv says so from their first sectors
            pv = lvm.read_pv(lambda offset, length: part.read(reader, offset, length),
                             part.size)
        except lvm.LvmError:
            continue
        except ImagingError:
            if strict:
                raise
            continue
        found += [Partition(part.number, part.start + volume.start, volume.size,
                            volume=volume.name,
                            pieces=tuple((part.start + start, size)
                                         for start, size in volume.pieces))
                  for volume in pv.volumes if volume.pieces]
    # Two PVs of disks installed alike (two ubuntu-vg/ubuntu-lv), or two names that make
    # one file name (a-/b and a/-b): none of them is shown.
    names = collections.Counter(lvm.file_name(volume.volume or "") for volume in found)
    return sorted((volume for volume in found if names[lvm.file_name(volume.volume or "")] == 1),
                  key=lambda volume: volume.volume or "")


@reads_image("mount")
def logical_volumes(image_dir: os.PathLike | str, *, progress: Optional[Progress] = None
                    ) -> list[Partition]:
    """The logical volumes the image's view shows (`volumes`), read from the image itself:
    a raw-mode backup's manifest does not list them."""
    image = Image.open(image_dir)
    return volumes(partitions(image), ImageReader(image, loans=1), strict=True)


def partition_or_volume(image: Image, reader: "ImageReader", which: int | str) -> Partition:
    """Partition `which` (a number) or the logical volume `which` ("vg0/root")."""
    if isinstance(which, int):
        return partition(image, which)
    found = volumes(partitions(image), reader)
    match = next((volume for volume in found if volume.volume == which), None)
    if match is None:
        have = ", ".join(volume.volume or "" for volume in found) or "none"
        raise ImageError(f"{image.path} has no logical volume {which} that is linear on "
                         f"the disk (its volumes: {have})")
    return match


def numbered(parts: Sequence[Numbered], number: int, owner: str) -> Numbered:
    """The one of `parts` (Partitions, or anything else with a .number) numbered `number`;
    ImageError "OWNER has no partition N (its partitions: ...)" if none is."""
    found = next((part for part in parts if part.number == number), None)
    if found is None:
        have = ", ".join(str(part.number) for part in parts) or "none"
        raise ImageError(f"{owner} has no partition {number} (its partitions: {have})")
    return found


@dataclasses.dataclass(eq=False)
class _Loan:
    """A frame buffer and a contents buffer: chunk `position` is in them once `ready`."""

    frames: bytearray
    contents: bytearray
    position: Optional[int] = None
    held: Contents = Contents(())  # views into the two buffers
    users: int = 0
    ready: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)


class ImageReader:
    """Any byte range of an image, decompressing only the chunks it touches.

    Thread-safe: concurrent reads of one chunk wait for a single decompression.
    All-zero chunks are served without reading anything.
    """

    def __init__(self, image: Image, cache_chunks: int = CACHE_CHUNKS, loans: int = LOANS,
                 ) -> None:
        self.image = image
        self.size = image.size
        self.chunk_size = image.chunk_size
        self.chunks_read = 0  # chunks decompressed from the datastore, a delta's base included
        self.chunk_bytes_read = 0  # their raw bytes
        self._entries = image.entries()
        self._cache_chunks = max(cache_chunks, 1)
        self._cache: collections.OrderedDict[int, concurrent.futures.Future] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._most_loans = max(loans, 1)
        self._loan_count = 0
        self._loans: collections.OrderedDict[int, _Loan] = collections.OrderedDict()
        self._spare_loans: list[_Loan] = []
        self._ahead: dict[int, list[int]] = {}  # a chunk: those to load once it is read
        self._loader: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`; fewer only at the end of the image."""
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset}")
        end = min(offset + length, self.size)
        pieces = []
        while offset < end:
            position = offset // self.chunk_size
            chunk = self.chunk(position)
            within = offset - position * self.chunk_size
            piece = memoryview(chunk)[within:within + end - offset]
            pieces.append(piece)
            offset += len(piece)
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    def holds_zeros(self, position: int) -> bool:
        return self._entries[position][0] == self.image.store.zero_name(self.image.chunk_length(position))

    @contextlib.contextmanager
    def lent(self, position: int) -> Iterator[Contents]:
        """Chunk `position` in one of a few reused buffers, for a caller that copies it out.

        Quicker than `chunk` when each chunk is wanted briefly (see
        chunks.read_chunk_into). A chunk given back stays decoded until its
        buffer is wanted for another, so the next file in the same chunk finds
        it there. All-zero and cached chunks are lent from where they are.
        """
        (digest, base), length = self._entries[position], self.image.chunk_length(position)
        if digest == self.image.store.zero_name(length):
            yield Contents([memoryview(codec.zeros(length))])
            return
        with self._lock:
            cached = self._cache.get(position)
        if cached is not None:
            yield Contents([memoryview(cached.result())])
            return
        loan, loading = self._borrow(position)
        try:
            if loading:
                try:
                    loan.held = read_chunk_into(self.image.store, digest, loan.frames,
                                                memoryview(loan.contents)[:length])
                except BaseException as exc:
                    with self._lock:
                        del self._loans[position]
                        loan.position = None  # its buffers go back to the spares
                    loan.ready.set_exception(exc)
                    raise
                self._count(2 if base else 1, length)
                loan.ready.set_result(None)
            else:
                loan.ready.result()
            yield loan.held
        finally:
            with self._returned:
                loan.users -= 1
                if not loan.users and loan.position is None:
                    self._spare_loans.append(loan)
                self._returned.notify()

    def _borrow(self, position: int) -> tuple[_Loan, bool]:
        """The loan holding chunk `position`, and whether the caller is to load it."""
        with self._returned:
            loan = self._loans.get(position)
            if loan is not None:
                loan.users += 1
                self._loans.move_to_end(position)
                return loan, False
            while True:
                if self._spare_loans:
                    loan = self._spare_loans.pop()
                    break
                # The least recently lent chunk nobody holds gives up its buffers.
                loan = next((held for held in self._loans.values() if not held.users), None)
                if loan is not None:
                    del self._loans[loan.position]
                    break
                if self._loan_count < self._most_loans:
                    self._loan_count += 1
                    loan = _Loan(bytearray(self.chunk_size + self.chunk_size // 128 + 4096),
                                 bytearray(self.chunk_size))
                    break
                self._returned.wait()
            loan.position, loan.users, loan.ready = position, 1, concurrent.futures.Future()
            self._loans[position] = loan
            return loan, True

    def _count(self, frames: int, length: int) -> None:
        with self._lock:
            self.chunks_read += frames
            self.chunk_bytes_read += frames * length

    def read_ahead(self, positions: Sequence[int]) -> None:
        """The chunks about to be read, in that order (replacing any order given before):
        from now on, reading one of them loads the next READ_AHEAD in the background, so
        that fetching, decompressing and checking them overlaps the caller's work with the
        one in hand (file reads, zstd and hashlib let other threads run). The first ones
        start loading at once."""
        order = list(dict.fromkeys(positions))
        with self._lock:
            self._ahead = {position: order[number + 1:number + 1 + READ_AHEAD]
                           for number, position in enumerate(order)}
        self._load_ahead(order[:READ_AHEAD])

    def stop_reading_ahead(self) -> None:
        """Forget the order read_ahead was given, and wait for the loads under way."""
        with self._lock:
            self._ahead, loader, self._loader = {}, self._loader, None
        if loader is not None:
            loader.shutdown(cancel_futures=True)

    def _load_ahead(self, positions: list[int]) -> None:
        if not positions:
            return
        with self._lock:
            if self._loader is None:
                self._loader = concurrent.futures.ThreadPoolExecutor(
                    READ_AHEAD, thread_name_prefix="read-ahead")
            loader = self._loader
        for position in positions:
            # A load that fails is left for the caller's own read, which tries again.
            loader.submit(self._load, position)

    def chunk(self, position: int) -> bytes:
        """The raw bytes of chunk `position`, from the cache or the datastore."""
        with self._lock:
            following = self._ahead.pop(position, None)
        if following:
            self._load_ahead(following)
        return self._load(position)

    def _load(self, position: int) -> bytes:
        (digest, base), length = self._entries[position], self.image.chunk_length(position)
        if digest == self.image.store.zero_name(length):
            return codec.zeros(length)
        with self._lock:
            loading = self._cache.get(position)
            owner = loading is None
            if owner:
                loading = self._cache[position] = concurrent.futures.Future()
                while len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(position)
        if not owner:
            return loading.result()
        try:
            data = read_chunk(self.image.store, digest, length)
        except BaseException as exc:
            with self._lock:
                if self._cache.get(position) is loading:
                    del self._cache[position]  # the next read tries again
            loading.set_exception(exc)
            raise
        self._count(2 if base else 1, length)
        loading.set_result(data)
        return data


class _ImageFiles:
    """The FUSE operations: a read-only directory of disk, p1, p2, ..."""

    use_ns = True  # times in nanoseconds (mfusepy)

    def __init__(self, reader: ImageReader, parts: list[Partition],
                 on_ready: Callable[[], None],
                 on_error: Optional[Callable[[ImagingError], None]] = None) -> None:
        self._reader = reader
        self._files = {"/disk": Partition(0, 0, reader.size)}
        self._files.update({f"/{part.name}": part for part in parts})
        self._on_ready = on_ready
        created = parse_stamp(reader.image.stamp).timestamp()
        times = {key: int(created) * 10**9 for key in ("st_atime", "st_mtime", "st_ctime")}
        self._owner = {"st_uid": os.getuid(), "st_gid": os.getgid(), **times}
        self._on_error = on_error
        self.failure: Optional[ImagingError] = None  # the first read that failed, and why

    def init(self, path: str) -> None:
        self._on_ready()

    def getattr(self, path: str, fh: Optional[int] = None) -> dict:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, **self._owner}
        if path not in self._files:
            raise _fuse().FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self._files[path].size,
                "st_blksize": self._reader.chunk_size, **self._owner}

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise _fuse().FuseOSError(errno.ENOTDIR)
        return [".", "..", *(name.lstrip("/") for name in self._files)]

    def open(self, path: str, flags: int) -> int:
        if path not in self._files:
            raise _fuse().FuseOSError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _fuse().FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        try:
            return self._files[path].read(self._reader, offset, size)
        except ImagingError as exc:
            # The reading tool sees EIO; whoever mounted it learns why, once.
            if self.failure is None:
                self.failure = exc
                if self._on_error is not None:
                    self._on_error(exc)
            raise _fuse().FuseOSError(errno.EIO) from None

    def statfs(self, path: str) -> dict:
        blocks = -(-self._reader.size // 4096)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": len(self._files), "f_ffree": 0,
                "f_namemax": 255, "f_flag": os.ST_RDONLY}


def _fuse():
    """mfusepy, loaded on first use: it looks for libfuse when imported."""
    try:
        import mfusepy
    except (ImportError, OSError, EnvironmentError) as exc:
        raise ImagingError(f"FUSE is not available: {exc} (install the {FUSE_PACKAGE} "
                           "package and the mfusepy Python package)") from None
    return mfusepy


def _check_mountpoint(mountpoint: Path) -> None:
    if not FUSE_DEVICE.exists():
        raise ImagingError(f"{FUSE_DEVICE} is missing: this system has no FUSE support")
    if not mountpoint.is_dir():
        raise ImagingError(f"cannot mount at {mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        raise ImagingError(f"cannot mount at {mountpoint}: something is already mounted there")


def _serve(files: _ImageFiles, image: Image, mountpoint: Path) -> None:
    """Serve the image's files at `mountpoint` until it is unmounted (in this thread)."""
    fuse = _fuse()
    disk = f"{image.disk_id}/{image.stamp}"
    try:
        fuse.FUSE(files, str(mountpoint), foreground=True,
                  ro=True, default_permissions=True, kernel_cache=True,
                  fsname=f"{FSNAME_PREFIX}{disk}", subtype="imaging")
    except RuntimeError as exc:
        # libfuse has printed its reason on stderr already.
        raise ImagingError(f"cannot mount {disk} at {mountpoint}: libfuse failed ({exc})") from None
    finally:
        # fuse_main ends by setting an ignored SIGPIPE (as Python has it) back to its default,
        # death: the process serving the mount in a thread (the web server, a worker) would
        # die at its next write to a socket or pipe its peer closed.
        ignore_signal(signal.SIGPIPE)


def unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount, lazily if something still holds it open."""
    if not os.path.ismount(mountpoint):
        return
    done = tools.run("fusermount3", FUSE_PACKAGE, ["-u", str(mountpoint)], text=True)
    if done.returncode != 0 and os.path.ismount(mountpoint):
        done = tools.run("fusermount3", FUSE_PACKAGE, ["-u", "-z", str(mountpoint)], text=True)
    if done.returncode != 0 and os.path.ismount(mountpoint):
        raise ImagingError(f"cannot unmount {mountpoint}: {tools.complaint(done)}")


@dataclasses.dataclass
class MountResult:
    mountpoint: str
    files: list[str]  # disk, p1, p2, ...
    seconds: float  # how long it was mounted
    chunks_read: int
    chunk_bytes_read: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mount(image_dir: os.PathLike | str, mountpoint: os.PathLike | str, *,
          on_mounted: Optional[Callable[[list[str]], None]] = None,
          on_error: Optional[Callable[[ImagingError], None]] = None,
          progress: Optional[Progress] = None) -> MountResult:
    """Expose the image at `mountpoint` until it is unmounted.

    `on_mounted` hears the file names once it is mounted; `on_error`, the
    first read that failed (the reading program got EIO).

    In the main thread, SIGINT, SIGTERM and SIGHUP unmount it: libfuse's own
    handlers take them (Python's could not run while libfuse holds the thread).
    """
    mountpoint = Path(mountpoint).absolute()
    progress = progress or Progress("mount", 0)
    started = time.monotonic()
    _check_mountpoint(mountpoint)
    with reading(image_dir, "mount", progress, f" at {mountpoint}") as image:
        reader = ImageReader(image)
        parts = partitions(image)
        parts += volumes(parts, reader)
        names = ["disk", *(part.name for part in parts)]
        stopped = threading.Event()
        failure: list[ImagingError] = []

        def watch() -> None:
            """End the mount when the job is cancelled or its heartbeat fails."""
            while not stopped.wait(WATCH_INTERVAL):
                try:
                    if not progress.cancelled():
                        continue
                except ImagingError as exc:
                    failure.append(exc)
                with contextlib.suppress(ImagingError):
                    unmount(mountpoint)
                return

        watcher = threading.Thread(target=watch, name="mount-watch", daemon=True)
        watcher.start()
        with _default_signals():
            try:
                files = _ImageFiles(reader, parts, lambda: on_mounted and on_mounted(names),
                                    on_error)
                _serve(files, image, mountpoint)
            finally:
                stopped.set()
                watcher.join()
        if failure:
            raise failure[0]
    progress.finish()
    return MountResult(str(mountpoint), names, round(time.monotonic() - started, 3),
                       reader.chunks_read, reader.chunk_bytes_read)


@contextlib.contextmanager
def _default_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP at their defaults, which libfuse replaces with its unmounting handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.signal(number, signal.SIG_DFL)
             for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


@dataclasses.dataclass(frozen=True)
class Exposure:
    """An image mounted privately: the paths its tools read, and the reader behind them."""

    root: Path
    partitions: list[Partition]
    reader: ImageReader
    served: _ImageFiles = dataclasses.field(repr=False)  # knows the first read that failed
    volumes: list[Partition] = dataclasses.field(default_factory=list)  # LVM's, as files too

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    def path(self, part: Partition) -> Path:
        return self.root / part.name

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """Tools reading the mount while the block runs: once a read under them has failed (a
        missing or corrupt chunk: the tool saw EIO), the block fails with its reason, whatever
        the tool made of it."""
        try:
            yield
        except ImagingError:
            if self.served.failure is not None:
                raise self.served.failure from None  # the cause behind the tool's complaint
            raise
        if self.served.failure is not None:
            raise self.served.failure


@contextlib.contextmanager
def exposed(image: Image, reader: Optional[ImageReader] = None) -> Iterator[Exposure]:
    """The image mounted read-only in a private temporary directory while the block runs.

    The caller registers itself as the image's reader. The mount is always
    undone, also when the block fails or is interrupted. A read that failed
    fails the block with its reason (Exposure.checked).
    """
    with privately_mounted(image, reader) as exposure, exposure.checked():
        yield exposure


@contextlib.contextmanager
def privately_mounted(image: Image, reader: Optional[ImageReader] = None) -> Iterator[Exposure]:
    """The image mounted read-only in a private temporary directory while the block runs,
    without `exposed`'s verdict on failed reads: for a caller that checks each of its
    tools' runs (Exposure.checked) and outlives a failed one."""
    undo_abandoned_mounts()
    reader = reader or ImageReader(image)
    parts = partitions(image)
    logical = volumes(parts, reader)
    # Named after this process, so whoever finds one left behind knows whose it was.
    root = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_MOUNT_PREFIX}{os.getpid()}-"))
    ready = threading.Event()
    failure: list[BaseException] = []

    files = _ImageFiles(reader, parts + logical, ready.set)

    def serve() -> None:
        try:
            _serve(files, image, root)
        except BaseException as exc:  # reported to the waiting thread
            failure.append(exc)

    server = threading.Thread(target=serve, name="fuse", daemon=True)
    try:
        _check_mountpoint(root)
        server.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not ready.wait(0.02):
            if not server.is_alive() or time.monotonic() > deadline:
                if failure and isinstance(failure[0], ImagingError):
                    raise failure[0]
                raise ImagingError(f"cannot mount {image.path} at {root}: "
                                   f"{failure[0] if failure else 'libfuse did not answer'}")
        yield Exposure(root, parts, reader, files, logical)
    finally:
        try:
            unmount(root)
        finally:
            if server.is_alive():
                server.join(MOUNT_TIMEOUT)
            with contextlib.suppress(OSError):
                root.rmdir()


def undo_abandoned_mounts() -> None:
    """Unmount and remove the private mounts whose process is gone (killed while it served
    one: nothing else would ever undo them). A mount names its process, and one left so no
    longer answers (ENOTCONN); should its number be in use again, it stays, as it would
    have anyway."""
    pattern = re.compile(re.escape(PRIVATE_MOUNT_PREFIX) + r"(\d+)-")
    for found in read_mounts():
        owner = pattern.match(Path(found.mount_point).name)
        if owner is None or not found.source.startswith(FSNAME_PREFIX) \
                or not _gone(owner.group(1)) or _answers(found.mount_point):
            continue
        # Lazily: a tool the dead process started may still hold a file open there.
        tools.run("fusermount3", FUSE_PACKAGE, ["-u", "-z", found.mount_point])
        with contextlib.suppress(OSError):
            os.rmdir(found.mount_point)


def _gone(pid: str) -> bool:
    """Is process `pid` dead: not there, or only what is left until its parent reaps it?"""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie, dead


def _answers(mountpoint: str) -> bool:
    """Does a FUSE mount still have its server (one in a process this one cannot see)?
    statfs asks the server every time, where stat may be answered from the kernel's cache."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno != errno.ENOTCONN
    return True
