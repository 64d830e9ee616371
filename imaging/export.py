"""Export: an image as one standard zstd stream of the whole disk, or as a VM's disk.

For offline copies and the classic workflow: `zstd -d` with no options decodes
it, because the window never exceeds the 128 MiB (2^27) zstd accepts by
default, even with long-distance matching. Parts are named the way `split`
names them, so `cat OUT.* | zstd -d | dd of=/dev/sdX` restores; their
checksums, in sha256sum's format, go to OUT.sha256 (OUT-parts.sha256 when
split, so that `cat OUT.*` picks up nothing but the stream). Every file is written under a
hidden temporary name and takes its real name only when the whole export has
succeeded, so an interrupted export never looks like a finished one.

The stream is a few zstd frames, one after another (`zstd -d` decodes them as
one stream). The store already knows which chunks do not compress: a long run
of them (a swap partition, encrypted or already compressed data) gets a frame
of its own at the fastest level, instead of costing the slow high levels
minutes for nothing, and leaves no noise in the other frames' windows. Each
other run is one frame that zstd compresses on every core.

As a VM's disk (`format`: qcow2, vmdk or vhdx), `qemu-img convert` reads the
image's read-only view (reading/mount.py) and writes a sparse file: an all-zero
chunk is served without reading anything, and qemu-img leaves it unallocated.
It too is written under a hidden name, with OUT.sha256 beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import math
import os
import re
import secrets
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import zstandard

from .base import tools
from .base.errors import Cancelled, TargetError, translated
from .base.pipeline import ordered_map
from .base.progress import Progress
from .base.splitnames import suffixes
from .datastore import codec
from .datastore.chunks import read_chunk
from .datastore.image import Image, IndexEntry
from .datastore.image import reads_image
from .base.syscalls import fsync_dir
from .datastore.store import write_atomically
from .reading.mount import privately_mounted

# zstd's decoders refuse larger windows unless told --long=N or --memory.
MAX_WINDOW_LOG = 27
# A chunk whose stored frame saves less than this share is treated as noise.
INCOMPRESSIBLE_RATIO = 0.98
# Shorter runs of noise stay inside their neighbours' frame: a frame boundary
# costs the next frame its window.
MIN_NOISE_RUN = 32 * 1024 * 1024
# zstd's own jobs at these levels are 128 MiB or more: a frame of a few hundred
# MiB in so few jobs leaves a core idle at its end.
MAX_JOB = 128 * 1024 * 1024
MIN_JOB = 1024 * 1024


def checksum_path(out: Path, split: bool) -> Path:
    return out.with_name(out.name + ("-parts.sha256" if split else ".sha256"))


ZSTD = "zstd"
# qemu-img's output format and options for each VM disk format: a sparse file each.
VM_FORMATS = {"qcow2": [], "vmdk": ["-o", "subformat=monolithicSparse"],
              "vhdx": ["-o", "subformat=dynamic"]}
FORMATS = (ZSTD, *VM_FORMATS)
# qemu-img convert -p: "    (42.50/100%)\r" as it goes.
PROGRESS_POLL = 0.25
QEMU_IMG_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclasses.dataclass
class ExportResult:
    files: list[Path]  # the stream's parts in order (or the one file), then the checksum file
    size: int  # disk bytes
    compressed_bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), files=[str(path) for path in self.files])


class _Parts:
    """A file-like sink that cuts the stream into parts and hashes each one."""

    def __init__(self, out: Path, part_size: Optional[int]) -> None:
        self.part_size = part_size
        if part_size:
            self._names = (out.with_name(f"{out.name}.{suffix}") for suffix in suffixes())
        else:
            self._names = iter([out])
        self.done: list[tuple[Path, Path, str]] = []  # (temporary, final, sha256)
        self.written = 0
        self._handle = None
        self._room = 0

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self._handle is None:
                self._open_next()
            take = len(view) if self.part_size is None else min(len(view), self._room)
            with translated(TargetError, "cannot write the export"):
                self._handle.write(view[:take])
            self._hash.update(view[:take])
            self._room -= take
            self.written += take
            view = view[take:]
            if self.part_size and not self._room:
                self._close_current()
        return len(data)

    def flush(self) -> None:
        """Parts are synced when complete; nothing to do mid-part."""

    def _open_next(self) -> None:
        final = next(self._names)
        temporary = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        with translated(TargetError, "cannot create the export"):
            self._handle = open(temporary, "xb")
        self._current = (temporary, final)
        self._hash = hashlib.sha256()
        self._room = self.part_size or 0

    def _close_current(self) -> None:
        handle, self._handle = self._handle, None
        with translated(TargetError, "cannot write the export"):
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()
        self.done.append((*self._current, self._hash.hexdigest()))

    def publish(self, checksums: Path) -> list[Path]:
        if self._handle is not None:
            self._close_current()
        finals = [final for _, final, _ in self.done]
        with translated(TargetError, "cannot name the export's files"):
            for temporary, final, _ in self.done:
                os.rename(temporary, final)
            write_atomically(checksums, "".join(f"{digest}  {final.name}\n"
                                                for _, final, digest in self.done).encode())
            fsync_dir(checksums.parent)
        return finals + [checksums]

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self.done.append((*self._current, ""))
        for temporary, _, _ in self.done:
            with contextlib.suppress(OSError):
                temporary.unlink()


def _check_free(out: Path) -> None:
    if not out.parent.is_dir():
        raise TargetError(f"cannot export to {out}: no such directory {out.parent}")
    # A restore reads `cat OUT.*`: any file caught by that glob would corrupt it.
    taken = ([out] if out.exists() else []) + sorted(out.parent.glob(glob.escape(out.name) + ".*"))
    if taken:
        raise TargetError(f"{taken[0]} already exists: export to a new name "
                          f"(a restore reads {out.name}.* whole)")


@dataclasses.dataclass
class _Frame:
    chunks: int
    size: int
    noise: bool


def _is_noise(image: Image, entry: IndexEntry, length: int) -> bool:
    """Whether the chunk hardly compresses, judged by its stored size (a delta's by its base's)."""
    if entry.digest == image.store.zero_name(length):
        return False
    try:
        stored = image.store.chunk_path(entry.base or entry.digest).stat().st_size
    except OSError:
        return False  # reading it will say what is wrong with it
    return stored >= length * INCOMPRESSIBLE_RATIO


def _plan_frames(image: Image) -> list[_Frame]:
    """Consecutive chunks grouped into frames: long runs of noise apart, the rest together."""
    runs: list[_Frame] = []
    for position, entry in enumerate(image.entries()):
        length = image.chunk_length(position)
        noise = _is_noise(image, entry, length)
        if runs and runs[-1].noise == noise:
            runs[-1].chunks += 1
            runs[-1].size += length
        else:
            runs.append(_Frame(1, length, noise))
    frames: list[_Frame] = []
    for run in runs:
        run.noise = run.noise and run.size >= MIN_NOISE_RUN
        if frames and frames[-1].noise == run.noise:
            frames[-1].chunks += run.chunks
            frames[-1].size += run.size
        else:
            frames.append(run)
    return frames


def _compressor(frame: _Frame, level: int, long_distance: bool) -> zstandard.ZstdCompressor:
    if frame.noise:
        return zstandard.ZstdCompressor(level=1, threads=-1, write_checksum=True,
                                        write_content_size=True)
    tuning = _long_distance_tuning(level, frame.size) if long_distance else {}
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=frame.size, threads=-1, write_checksum=True,
        write_content_size=True, **tuning)
    return zstandard.ZstdCompressor(compression_params=params)


def _long_distance_tuning(level: int, frame_size: int) -> dict:
    """Level tables never go past a 2^27 window: long-distance matching asks for it.

    At the optimal-parsing levels (19 and up) the rest follows that window too.
    Measured on an 870 MiB ext4 partition of /usr files at level 19, zstd's
    choices give 172.2 MiB for 341 CPU s and 660 MiB of memory; these give
    171.3 MiB for 324 CPU s and 1.1 GiB, and `zstd -d` runs 4% faster:
    - match tables of at least level 20's size, to see further back;
    - each multi-threaded job starts from as much of the data before it as those
      tables hold, not the whole window (re-indexing 32 MiB before each job cost
      a sixth of the CPU time);
    - the long-distance matcher offers repeats from 16 bytes (not 32) and samples
      twice as many positions;
    - jobs split the frame evenly over the cores.
    """
    tuning = {"enable_ldm": True, "window_log": MAX_WINDOW_LOG}
    base = zstandard.ZstdCompressionParameters.from_level(level, source_size=frame_size)
    if base.strategy != zstandard.STRATEGY_BTULTRA2:
        return tuning
    chain_log = max(base.chain_log, 25)
    # A binary tree holds 2^(chain_log - 1) positions; a job's overlap is
    # 2^(window_log - 9 + overlap_log) bytes.
    overlap_log = chain_log - 1 - MAX_WINDOW_LOG + 9
    return tuning | {"chain_log": chain_log, "hash_log": max(base.hash_log, 23),
                     "overlap_log": overlap_log, "ldm_min_match": 16, "ldm_hash_rate_log": 3,
                     "job_size": _even_job_size(frame_size)}


def _even_job_size(frame_size: int) -> int:
    """Jobs of at most MAX_JOB, as many as a multiple of the cores, so that no
    core idles while the last job of the frame runs alone."""
    cores = os.cpu_count() or 1
    jobs = math.ceil(math.ceil(frame_size / MAX_JOB) / cores) * cores
    return max(MIN_JOB, math.ceil(frame_size / jobs))


def _disk_bytes(image: Image, index: list[str], progress: Progress,
                workers: Optional[int]) -> Iterator[bytes]:
    """The image's chunks in disk order, each checked, read ahead by a thread pool."""
    def checked_chunk(position: int) -> bytes:
        return read_chunk(image.store, index[position], image.chunk_length(position))

    chunks = ordered_map(checked_chunk, range(len(index)), workers=workers,
                         cancelled=progress.cancelled, name="export")
    with contextlib.closing(chunks):
        for _, data in chunks:
            yield data


def check_format(format: str, split_size: Optional[int], long_distance: bool) -> None:
    """TargetError for a format this does not write, or the zstd stream's options given
    with a VM disk's."""
    if format not in FORMATS:
        raise TargetError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    if format != ZSTD and (split_size is not None or long_distance):
        raise TargetError(f"a {format} export is one file of its own format: parts and "
                          "long-distance matching are for the zstd stream")


@reads_image("export")
def export(image_dir: os.PathLike | str, out: os.PathLike | str, *,
           level: int = codec.DEFAULT_LEVEL, long_distance: bool = False,
           split_size: Optional[int] = None, progress: Optional[Progress] = None,
           workers: Optional[int] = None, format: str = ZSTD) -> ExportResult:
    started = time.monotonic()
    check_format(format, split_size, long_distance)
    codec.check_level(level)
    if split_size is not None and split_size <= 0:
        raise TargetError(f"invalid part size {split_size}: it must be positive")
    image = Image.open(image_dir)
    out = Path(out)
    _check_free(out)
    progress = progress or Progress("export", image.size)
    if format != ZSTD:
        return _vm_disk(image, out, format, progress, started)
    index = image.index()
    frames = _plan_frames(image)
    progress.start_phase("export", image.size)
    parts = _Parts(out, split_size)
    try:
        with contextlib.closing(_disk_bytes(image, index, progress, workers)) as chunks:
            for frame in frames:
                compressor = _compressor(frame, level, long_distance)
                # Not a `with`: closing ends the frame, and a frame cut short by an
                # error or a cancel would raise zstd's "Src size is incorrect" over
                # the real reason. The parts of a failed export are discarded anyway.
                stream = compressor.stream_writer(parts, size=frame.size, closefd=False)
                for data in itertools.islice(chunks, frame.chunks):
                    stream.write(data)
                    progress.advance(len(data))
                stream.close()
        files = parts.publish(checksum_path(out, split_size is not None))
    except BaseException:
        parts.discard()
        raise
    progress.finish()
    return ExportResult(files, image.size, parts.written, round(time.monotonic() - started, 3))


def _vm_disk(image: Image, out: Path, format: str, progress: Progress,
             started: float) -> ExportResult:
    """The image as a sparse VM disk of `format`, written by qemu-img from the image's view."""
    temporary = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    progress.start_phase("export", image.size)
    try:
        # Its complaints in a file: a pipe read only at its end could fill and stop it.
        with privately_mounted(image) as exposure, tempfile.TemporaryFile() as complaints:
            process = tools.started(
                tools.QEMU_IMG, tools.QEMU_IMG_PACKAGE,
                ["convert", "-p", "-f", "raw", "-O", format, *VM_FORMATS[format],
                 str(exposure.root / "disk"), str(temporary)],
                kind=TargetError, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=complaints)
            with tools.stopping(process), process.stdout:
                _follow(process, image.size, progress)
                complaints.seek(0)
                errors = complaints.read()
                if process.wait() != 0:
                    with exposure.checked():  # a chunk the view could not read says so
                        raise TargetError(f"cannot export to {out}: qemu-img: "
                                          f"{tools.last_line(errors)}")
        digest = hashlib.sha256()
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
            while piece := written.read(4 * 1024 * 1024):
                digest.update(piece)
        with translated(TargetError, "cannot name the export's file"):
            os.rename(temporary, out)
            checksums = checksum_path(out, split=False)
            write_atomically(checksums, f"{digest.hexdigest()}  {out.name}\n".encode())
            fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    progress.finish()
    return ExportResult([out, checksums], image.size, out.stat().st_blocks * 512,
                        round(time.monotonic() - started, 3))


def _follow(process: subprocess.Popen, size: int, progress: Progress) -> None:
    """Advance `progress` as qemu-img says it goes, until it closes its output; Cancelled
    (the process then stopped by the caller) when asked to stop."""
    said = b""
    while True:
        if progress.cancelled():
            raise Cancelled("export cancelled")
        ready, _, _ = select.select([process.stdout], [], [], PROGRESS_POLL)
        if not ready:
            continue
        data = os.read(process.stdout.fileno(), 4096)
        if not data:
            return
        said = (said + data)[-256:]
        percents = QEMU_IMG_PROGRESS.findall(said)
        if percents:
            progress.advance(int(float(percents[-1]) / 100 * size) - progress.done)
