"""Backup: read a disk in chunks, store each new chunk once, publish an image.

The calling thread reads sequentially and feeds the whole-image SHA-256; a
pool of threads hashes, compresses and writes chunks (hashlib and zstd
release the GIL, so every core works). At most a few chunks are in flight, so
memory stays flat whatever the disk size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import badmap, codec, layout, recipe, usedmap
from .device import Range, Source
from .errors import ImagingError, SourceError
from .image import FORMAT, STATUS_COMPLETE, STATUS_READ_ERRORS, ImageWriter
from .inventory import identify
from .pipeline import ordered_map
from .progress import Progress
from .store import DEFAULT_CHUNK_SIZE, Datastore, check_disk_id

# A read plan names, for a chunk (offset, length), the ranges worth reading;
# None means read everything. `used` mode plans from filesystem block maps.
ReadPlan = Callable[[int, int], Optional[list[Range]]]
MODES = ("raw", "used")


@dataclasses.dataclass
class BackupResult:
    image: Path
    size: int
    seconds: float
    stored_bytes: int
    new_bytes: int
    bad_bytes: int
    sha256: str
    status: str

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), image=str(self.image))


class _ChunkSink:
    """Stores chunks; runs in worker threads."""

    def __init__(self, store: Datastore, level: int) -> None:
        self.store = store
        self.level = level
        self.batch = store.chunk_batch()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def put(self, buf: bytearray) -> tuple[str, int, int]:
        """Return (digest, stored bytes if first use in this image, new bytes)."""
        digest = codec.digest(buf)
        with self._lock:
            if digest in self._seen:
                return digest, 0, 0
            self._seen.add(digest)
        # Size first, then touch: garbage collection may move an unreferenced
        # chunk aside at any moment and honours only a touch that landed
        # before; a chunk found gone is simply stored again.
        try:
            size = self.store.chunk_path(digest).stat().st_size
        except FileNotFoundError:
            size = None
        if size is not None and self.store.touch_chunk(digest):
            return digest, size, 0
        frame = codec.compress(buf, self.level)
        self.batch.add(digest, frame)
        return digest, len(frame), len(frame)


def backup(source_path: str, store_dir: os.PathLike | str, *, disk_id: Optional[str] = None,
           level: int = codec.DEFAULT_LEVEL, mode: str = "raw", read_plan: Optional[ReadPlan] = None,
           manifest_extra: Optional[dict] = None, progress: Optional[Progress] = None,
           chunk_size: int = DEFAULT_CHUNK_SIZE, workers: Optional[int] = None,
           force: bool = False) -> BackupResult:
    """`force`: in used mode, image a disk even while it is mounted read-write."""
    if mode not in MODES:
        raise ImagingError(f"unknown backup mode {mode!r}: use one of {', '.join(MODES)}")
    started = time.monotonic()
    identity = identify(source_path)
    disk_id = check_disk_id(disk_id or identity["id"])
    store = Datastore.open_or_create(store_dir, chunk_size)
    with Source.open(source_path) as source:
        progress = progress or Progress("backup", source.size)
        progress.total = source.size
        if mode == "used" and read_plan is None:
            used = usedmap.plan(source, force=force)
            read_plan = used.wanted
            manifest_extra = {**used.manifest_extra(), **(manifest_extra or {})}
        try:
            table, layout_error = layout.dump(source_path), None
        except SourceError as exc:
            # A failing disk may not let sfdisk read it; the sectors still matter more.
            table, layout_error = None, str(exc)
        mbr, _ = source.read(0, min(layout.MBR_SIZE, source.size))
        writer = ImageWriter(store, disk_id)
        try:
            # Registered until the image is published: garbage collection must
            # never see this backup's chunks as neither a writer's nor an image's.
            with store.writer(f"backup {disk_id}"):
                index, whole, bad = _copy_chunks(source, store, level, read_plan, progress, workers)
                identity["id"] = disk_id
                result = publish_image(
                    writer, identity=identity, size=source.size, sector_size=source.sector_size,
                    level=level, mode=mode, index=index, sha256=whole, bad=bad, mbr=bytes(mbr),
                    table=table, progress=progress, started=started, manifest_extra={
                        **({"layout_error": layout_error} if layout_error else {}),
                        **(manifest_extra or {})})
        except BaseException:
            writer.discard()
            raise
    progress.finish()
    return result


def publish_image(writer: ImageWriter, *, identity: dict, size: int, sector_size: int, level: int,
                  mode: str, index: list[str], sha256: str, bad: list[Range], mbr: bytes,
                  table: Optional[str], progress: Progress, started: float,
                  manifest_extra: Optional[dict] = None) -> BackupResult:
    """Write an image's files and manifest and publish it; the caller discards on failure."""
    store = writer.store
    bad_bytes = sum(length for _, length in bad)
    status = STATUS_READ_ERRORS if bad else STATUS_COMPLETE
    seconds = round(time.monotonic() - started, 3)
    manifest = {
        "format": FORMAT, "disk": identity, "size": size,
        "chunk_size": store.chunk_size, "sector_size": sector_size,
        "sha256": sha256, "created": writer.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": seconds, "level": level, "chunks": len(index),
        "stored_bytes": progress.stored_bytes, "new_bytes": progress.new_bytes,
        "bad_bytes": bad_bytes, "mode": mode, "status": status,
        **(manifest_extra or {}),
    }
    index_text = "".join(f"{d}\n" for d in index)
    manifest["index_sha256"] = hashlib.sha256(index_text.encode()).hexdigest()
    writer.write("index", index_text)
    writer.write("mbr.bin", mbr)
    if table is not None:
        writer.write("layout.sf", table)
    writer.write("badblocks.map", badmap.render(size, bad))
    writer.write("RESTORE.txt", recipe.render(
        disk_id=writer.disk_id, created=manifest["created"], size=size,
        chunk_size=store.chunk_size, sha256=sha256, image_dir=str(writer.final)))
    image_dir = writer.commit(manifest)
    return BackupResult(image_dir, size, seconds, manifest["stored_bytes"],
                        manifest["new_bytes"], bad_bytes, sha256, status)


def _copy_chunks(source: Source, store: Datastore, level: int, read_plan: Optional[ReadPlan],
                 progress: Progress, workers: Optional[int]) -> tuple[list[str], str, list[Range]]:
    def reads():
        for offset in range(0, source.size, store.chunk_size):
            length = min(store.chunk_size, source.size - offset)
            wanted = read_plan(offset, length) if read_plan else None
            yield source.read(offset, length, wanted, progress.cancelled)

    return store_chunks(reads(), store, level, progress, workers)


def store_chunks(chunks: Iterable[tuple[bytearray, list[Range]]], store: Datastore, level: int,
                 progress: Progress, workers: Optional[int]) -> tuple[list[str], str, list[Range]]:
    """Store a disk given as its chunks in order, each with its unreadable ranges.

    Returns the index, the whole disk's SHA-256 and the unreadable ranges.
    """
    sink = _ChunkSink(store, level)
    whole = hashlib.sha256()
    index: list[str] = []
    bad: list[Range] = []
    stored = ordered_map(lambda chunk: sink.put(chunk[0]), chunks, workers=workers,
                         cancelled=progress.cancelled, name="chunk")
    try:
        with contextlib.closing(stored):
            for (buf, chunk_bad), (digest, stored_bytes, new_bytes) in stored:
                if sink.batch.due():
                    sink.batch.flush()
                whole.update(buf)
                index.append(digest)
                bad.extend(chunk_bad)
                progress.advance(len(buf), bad=sum(n for _, n in chunk_bad),
                                 stored=stored_bytes, new=new_bytes)
        sink.batch.flush()
    except BaseException:
        sink.batch.discard()
        raise
    return index, whole.hexdigest(), bad
