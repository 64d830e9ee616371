"""Import: turn a classic backup into an ordinary, deduplicated image.

Classic backups are `dd | gzip -9 > sda.gz` (maybe cut by `split -b` into
sda.gz.aa, sda.gz.ab, ...), 7z, xz or zstd archives of such a stream, or a raw
`dd` image, often with an `sfdisk -d` dump (sda.sf) and the boot sector
(sda.mbr) beside them. The format is read from the first bytes, never from the
name. Compressed data is decoded by the real tools (gzip, xz, zstd, 7-Zip) in a
child process, which runs on a core of its own while this process hashes and
compresses; their exit status is the integrity check, taken before the image
is published, so a truncated or corrupt archive leaves no image behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .backup import BackupResult, previous_entries, publish_image, store_chunks
from .base import tools
from .base.errors import ImagingError, SourceError, translated
from .base.progress import Progress
from .base.splitnames import ALPHABETIC, NUMERIC, suffixes
from .datastore import codec
from .datastore.image import ImageWriter
from .datastore.manifest import utc_text
from .datastore.store import DEFAULT_CHUNK_SIZE, Datastore, check_disk_id
from .disks.inventory import host_name

SECTOR = 512
LAYOUT_SUFFIX = ".sf"
MBR_SUFFIX = ".mbr"
FEED_BLOCK = 1024 * 1024
# Enough to see every signature below, tar's at offset 257 included.
HEADER_BYTES = 512


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    magic: bytes
    offset: int = 0
    # A command that decodes stdin to stdout; 7-Zip reads its archive by name instead.
    decoder: tuple[str, ...] = ()
    package: str = ""  # the Debian package of the decoding tool

    def matches(self, header: bytes) -> bool:
        return header[self.offset:self.offset + len(self.magic)] == self.magic


RAW = Format("raw", b"")
GZIP = Format("gzip", b"\x1f\x8b", decoder=("gzip", "-dc"), package="gzip")
XZ = Format("xz", b"\xfd7zXZ\x00", decoder=("xz", "-dc"), package="xz-utils")
# --long=31 lifts the decoder's memory limit for archives made with a large window.
ZSTD = Format("zstd", b"\x28\xb5\x2f\xfd", decoder=("zstd", "-dcq", "--long=31"),
              package="zstd")
# pzstd and some other writers open with a skippable frame instead.
ZSTD_SKIPPABLE = dataclasses.replace(ZSTD, magic=b"\x2a\x4d\x18", offset=1)
SEVEN_ZIP = Format("7z", b"7z\xbc\xaf\x27\x1c", package="p7zip-full")
IMPORTABLE = (GZIP, XZ, ZSTD, ZSTD_SKIPPABLE, SEVEN_ZIP)
# Recognised so that they are refused by name instead of imported as a raw disk.
NOT_IMPORTABLE = (
    Format("bzip2", b"BZh"), Format("lz4", b"\x04\x22\x4d\x18"), Format("zip", b"PK\x03\x04"),
    Format("rar", b"Rar!\x1a\x07"), Format("lzip", b"LZIP"), Format("lzop", b"\x89LZO\x00"),
    Format("tar", b"ustar", offset=257),
)


def detect_format(path: Path) -> Format:
    with translated(SourceError, "cannot read the archive"):
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
    for candidate in IMPORTABLE:
        if candidate.matches(header):
            return candidate
    for candidate in NOT_IMPORTABLE:
        if candidate.matches(header):
            raise SourceError(f"{path}: a {candidate.name} archive; import reads gzip, 7z, xz, "
                              "zstd or a raw disk image")
    return RAW


# -- naming: split parts and the files beside them ---------------------------
def _split_suffix(path: Path) -> Optional[str]:
    suffix = path.suffix[1:]
    if len(suffix) >= 2 and (suffix.isdigit() or (suffix.isalpha() and suffix.islower())):
        return suffix
    return None


def _split_sequence(first_suffix: str) -> Iterator[str]:
    """The suffixes split would have made in a run that began with `first_suffix`."""
    alphabet = NUMERIC if first_suffix.isdigit() else ALPHABETIC
    return suffixes(alphabet, None if len(first_suffix) == 2 else len(first_suffix))


def _starts_a_split(path: Path) -> bool:
    suffix = _split_suffix(path)
    return suffix is not None and next(_split_sequence(suffix)) == suffix


def order_parts(paths: Sequence[Path]) -> list[Path]:
    """The parts of a split archive in split's order, checked to be all there.

    A single file is the whole archive, unless it is the first of several parts.
    """
    if len(paths) == 1 and not _starts_a_split(paths[0]):
        return list(paths)
    by_suffix: dict[str, Path] = {}
    for path in paths:
        suffix = _split_suffix(path)
        if suffix is None:
            raise SourceError(f"{path}: not a part of a split archive (NAME.aa, NAME.ab, ...); "
                              "name one archive or all the parts of one")
        if path.with_suffix("") != paths[0].with_suffix(""):
            raise SourceError(f"{paths[0]} and {path} are not parts of one split archive")
        if suffix in by_suffix:
            raise SourceError(f"{path} is named twice")
        by_suffix[suffix] = path
    ordered = sorted(by_suffix)
    first = by_suffix[ordered[0]]
    sequence = _split_sequence(ordered[0])
    if next(sequence) != ordered[0]:
        raise SourceError(f"{first} is not the first part: name every part of the split archive")
    for suffix in ordered[1:]:
        expected = next(sequence)
        if suffix != expected:
            raise SourceError(f"{first.with_suffix('.' + expected)} is missing: "
                              "name every part of the split archive")
    following = first.with_suffix("." + next(sequence))
    if following.exists():
        raise SourceError(f"{following} exists too: name every part of the split archive "
                          f"(e.g. {first.with_suffix('')}.*)")
    return [by_suffix[suffix] for suffix in ordered]


def _beside(archive: Path, suffix: str) -> Optional[Path]:
    """sda.gz.aa -> the first of sda.gz.aa.sf, sda.gz.sf, sda.sf that exists."""
    stem = archive
    while True:
        companion = stem.with_name(stem.name + suffix)
        if companion.is_file():
            return companion
        if not stem.suffix:
            return None
        stem = stem.with_suffix("")


def _label(parts: Sequence[Path]) -> str:
    return str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"


def _read_layout(path: Path) -> str:
    with translated(SourceError, "cannot read the partition table dump"):
        text = path.read_text(errors="replace")
    if not any(line.startswith("label:") for line in text.splitlines()):
        raise SourceError(f"{path}: not an `sfdisk -d` dump (it has no 'label:' line)")
    return text


def _read_mbr(path: Path) -> bytes:
    with translated(SourceError, "cannot read the boot sector"):
        data = path.read_bytes()
    if len(data) < SECTOR:
        raise SourceError(f"{path}: {len(data)} bytes; a boot sector dump has {SECTOR}")
    return data[:SECTOR]


# -- reading the disk out of the archive --------------------------------------
class _Concatenation:
    """The parts read back to back as one file, counting the bytes read."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._pending = list(paths)
        self._current = None
        self.consumed = 0
        with translated(SourceError, "cannot read the archive"):
            self.size = sum(path.stat().st_size for path in paths)

    def readinto(self, view: memoryview) -> int:
        while True:
            if self._current is None:
                if not self._pending:
                    return 0
                path = self._pending.pop(0)
                with translated(SourceError, "cannot read the archive"):
                    self._current = open(path, "rb", buffering=0)
            with translated(SourceError, f"cannot read {self._current.name}"):
                got = self._current.readinto(view)
            if got:
                self.consumed += got
                return got
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()

    def expected_size(self, done: int) -> int:
        return self.size

    def finish(self) -> None:
        """Raw data needs no integrity check beyond being readable."""


class _Decoder:
    """A decoding tool's output; `finish` turns its failure into one clear line."""

    def __init__(self, fmt: Format, argv: Sequence[str], label: str,
                 feed: Optional[_Concatenation] = None, size: Optional[int] = None) -> None:
        self.fmt, self.label, self.feed, self.size = fmt, label, feed, size
        self.feed_error: Optional[BaseException] = None
        with translated(SourceError, f"cannot start {argv[0]}"):
            self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = tools.started(
                argv[0], fmt.package, argv[1:], kind=SourceError,
                stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)
        except SourceError:
            self._stderr.close()
            raise
        self._feeder = None
        if feed is not None:
            self._feeder = threading.Thread(target=self._feed, name="import-feed", daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        block = memoryview(bytearray(FEED_BLOCK))
        try:
            while got := self.feed.readinto(block):
                pending = block[:got]
                while pending:
                    pending = pending[self.proc.stdin.write(pending):]
        except BrokenPipeError:
            pass  # the decoder stopped early; its exit status says why
        except (OSError, ImagingError) as exc:
            self.feed_error = exc
        finally:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def readinto(self, view: memoryview) -> int:
        return self.proc.stdout.readinto(view)

    def expected_size(self, done: int) -> int:
        if self.size is not None:
            return self.size
        # The compression ratio so far predicts the rest.
        return round(done * self.feed.size / self.feed.consumed) if self.feed.consumed else 0

    def finish(self) -> None:
        if self._feeder is not None:
            self._feeder.join()
        status = self.proc.wait()
        if isinstance(self.feed_error, ImagingError):
            raise self.feed_error
        if self.feed_error is not None:
            raise SourceError(f"cannot feed {self.label} to {self.fmt.name}: {self.feed_error}")
        if status != 0:
            self._stderr.seek(0)
            complaint = tools.last_line(self._stderr.read())
            raise SourceError(f"{self.label}: truncated or corrupt {self.fmt.name} data "
                              f"({complaint or f'{self.proc.args[0]} exited {status}'})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        if self._feeder is not None:
            self._feeder.join()
        self._stderr.close()


def _seven_zip_entry(archive: Path, label: str) -> int:
    """The size of the one file a 7z archive must hold; refuse anything else."""
    listing = tools.run("7za", SEVEN_ZIP.package, ["l", "-slt", "-bd", str(archive)],
                        kind=SourceError, text=True)
    if listing.returncode != 0:
        raise SourceError(f"{label}: truncated or corrupt 7z archive ({tools.complaint(listing)})")
    _, _, files = listing.stdout.partition("\n----------\n")
    entries = [dict(line.split(" = ", 1) for line in block.splitlines() if " = " in line)
               for block in files.split("\n\n") if "Path = " in block]
    if len(entries) != 1:
        raise SourceError(f"{label}: a 7z archive of {len(entries)} files; import needs "
                          "one holding a single disk image")
    if entries[0].get("Encrypted") == "+":
        raise SourceError(f"{label}: an encrypted 7z archive; decrypt it first")
    return int(entries[0]["Size"])


@contextlib.contextmanager
def _seven_zip_volume(parts: Sequence[Path], label: str):
    """7-Zip reads split volumes named NAME.7z.001, .002, ...: links give it those names."""
    with translated(SourceError, f"cannot prepare {label} for 7-Zip"):
        folder = tempfile.mkdtemp(prefix="imaging-import-")
    try:
        with translated(SourceError, f"cannot prepare {label} for 7-Zip"):
            if len(parts) == 1:
                volume = Path(folder, "archive.7z")
                volume.symlink_to(parts[0].resolve())
            else:
                for number, part in enumerate(parts, 1):
                    Path(folder, f"archive.7z.{number:03d}").symlink_to(part.resolve())
                volume = Path(folder, "archive.7z.001")
        yield volume
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def open_disk_stream(fmt: Format, parts: Sequence[Path]):
    """The raw disk bytes inside the archive, as an object with readinto/finish."""
    label = _label(parts)
    if fmt is SEVEN_ZIP:
        with _seven_zip_volume(parts, label) as volume:
            size = _seven_zip_entry(volume, label)
            stream = _Decoder(fmt, ["7za", "x", "-so", "-bd", str(volume)], label, size=size)
            try:
                yield stream
            finally:
                stream.close()
        return
    concatenation = _Concatenation(parts)
    stream = _Decoder(fmt, fmt.decoder, label, feed=concatenation) if fmt.decoder else concatenation
    try:
        yield stream
    finally:
        stream.close()
        concatenation.close()


class _ChunkReader:
    """Cuts the disk stream into chunks for the backup pipeline, noting its size and head.

    The stream's integrity is checked at its end, before the pipeline lets
    the last batch of chunks into the store.
    """

    def __init__(self, stream, chunk_size: int, progress: Progress, label: str, fmt: Format) -> None:
        self.stream, self.chunk_size, self.progress = stream, chunk_size, progress
        self.label, self.fmt = label, fmt
        self.size = 0
        self.head = b""

    def __iter__(self):
        while True:
            buf = bytearray(self.chunk_size)
            view = memoryview(buf)
            got = 0
            while got < len(buf) and (step := self.stream.readinto(view[got:])):
                got += step
            view.release()
            if got < len(buf):
                del buf[got:]
            if not self.size:
                self.head = bytes(buf[:SECTOR])
            self.size += got
            if got < self.chunk_size:
                self._check_end()
            self.progress.total = max(self.size, self.stream.expected_size(self.size))
            if buf:
                yield buf, []
            if got < self.chunk_size:
                return

    def _check_end(self) -> None:
        self.stream.finish()
        what = "raw image" if self.fmt is RAW else f"{self.fmt.name} archive"
        if self.size == 0:
            raise SourceError(f"{self.label}: the {what} holds no data")
        if self.size % SECTOR:
            raise SourceError(f"{self.label}: not a disk image: the {what} holds {self.size} bytes, "
                              f"not a whole number of {SECTOR}-byte sectors")


def import_archive(files: Sequence[os.PathLike | str], store_dir: os.PathLike | str, *,
                   disk_id: str, level: int = codec.DEFAULT_LEVEL,
                   progress: Optional[Progress] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   workers: Optional[int] = None) -> BackupResult:
    """Ingest a classic backup (FILES: one archive or all parts of a split one)."""
    started = time.monotonic()
    disk_id = check_disk_id(disk_id)
    codec.check_level(level)
    paths = [Path(name) for name in files]
    if not paths:
        raise SourceError("name the archive to import")
    for path in paths:
        if not path.is_file():
            raise SourceError(f"cannot import {path}: "
                              f"{'not a regular file' if path.exists() else 'no such file'}")
    named_layouts = [p for p in paths if p.suffix == LAYOUT_SUFFIX]
    named_mbrs = [p for p in paths if p.suffix == MBR_SUFFIX]
    data = [p for p in paths if p not in named_layouts and p not in named_mbrs]
    if not data or len(named_layouts) > 1 or len(named_mbrs) > 1:
        raise SourceError("name one archive (or its parts), at most one .sf and one .mbr file")
    parts = order_parts(data)
    layout_path = named_layouts[0] if named_layouts else _beside(parts[0], LAYOUT_SUFFIX)
    mbr_path = named_mbrs[0] if named_mbrs else _beside(parts[0], MBR_SUFFIX)
    table = _read_layout(layout_path) if layout_path else None
    boot_sector = _read_mbr(mbr_path) if mbr_path else None
    fmt = detect_format(parts[0])
    if fmt is RAW and sum(p.stat().st_size for p in parts) % SECTOR:
        raise SourceError(f"{parts[0]}: unknown format: not gzip, 7z, xz or zstd, and not a raw "
                          f"disk image (its size is not a whole number of {SECTOR}-byte sectors)")
    # The archive's time is when the classic backup was taken: that places it in the history.
    taken = dt.datetime.fromtimestamp(max(p.stat().st_mtime for p in parts), dt.timezone.utc)
    store = Datastore.open_or_create(store_dir, chunk_size)
    progress = progress or Progress("import", 0)
    progress.start_phase("import", 0)
    with open_disk_stream(fmt, parts) as stream:
        reader = _ChunkReader(stream, store.chunk_size, progress, _label(parts), fmt)
        writer = ImageWriter(store, disk_id, taken)
        try:
            with store.register("import", f"import {disk_id}", progress=progress):
                index, whole, bad = store_chunks(reader, store, level, progress, workers,
                                                 previous_entries(store, disk_id))
                identity = {
                    "id": disk_id, "source": "import", "archive_format": fmt.name,
                    "files": [str(p.resolve()) for p in parts],
                    "layout_file": str(layout_path.resolve()) if layout_path else None,
                    "mbr_file": str(mbr_path.resolve()) if mbr_path else None,
                    "model": None, "serial": None, "wwn": None, "size": reader.size,
                    "path": None, "host": host_name(),
                }
                result = publish_image(
                    writer, identity=identity, size=reader.size, sector_size=SECTOR, level=level,
                    mode="raw", index=index, sha256=whole, bad=bad,
                    mbr=boot_sector or reader.head, table=table, progress=progress,
                    started=started,
                    notes={"imported": utc_text(dt.datetime.now(dt.timezone.utc))})
        except BaseException:
            writer.discard()
            raise
    progress.finish()
    return result
