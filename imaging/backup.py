"""Backup: read a disk in chunks, store each new chunk once, publish an image.

The calling thread reads sequentially and feeds the whole-image SHA-256; a
pool of threads hashes, compresses and writes chunks (hashlib and zstd
release the GIL, so every core works). At most a few chunks are in flight, so
memory stays flat whatever the disk size.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .base.errors import ImageError, ImagingError, SourceError, SourceInUse, StoreError, describe
from .base.pipeline import ordered_map
from .base.progress import Progress
from .datastore import badmap, codec, recipe
from .datastore.chunks import base_bytes
from .datastore.image import Image, ImageWriter, IndexEntry
from .datastore.manifest import MODES, STATUS_COMPLETE, STATUS_READ_ERRORS, Manifest, utc_text
from .datastore.store import DEFAULT_CHUNK_SIZE, Datastore, check_disk_id
from .disks import layout, usedmap
from .disks.device import Range, Source
from .disks.inventory import identify

# A read plan names, for a chunk (offset, length), the ranges worth reading;
# None means read everything. `used` mode plans from filesystem block maps.
ReadPlan = Callable[[int, int], Optional[list[Range]]]


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
    mounted_rw: bool  # forced past a read-write mount: the image may mix moments

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), image=str(self.image))


# A delta over half its base's size is mostly new data: stored whole instead
# unless that is this much larger, so the nights after have a closer base.
REANCHOR_RATIO = 1.25


class _ChunkSink:
    """Stores chunks; runs in worker threads.

    Given the disk's previous image, a chunk that changed is stored as a delta
    against the chunk at its place there (or against that chunk's own base, as
    a base always stands alone), or whole when it is mostly new (see
    REANCHOR_RATIO); a whole chunk becomes the base of the nights after.
    """

    def __init__(self, store: Datastore, level: int, previous: Optional[Sequence[IndexEntry]] = (),
                 ) -> None:
        """`previous` None: store every chunk whole, a stored delta too (stored again)."""
        self.store = store
        self.level = level
        self.batch = store.chunk_batch()
        self._whole = previous is None
        self._previous = previous or ()
        self._claimed: dict[str, concurrent.futures.Future] = {}
        self._counted: set[str] = set()
        self._lock = threading.Lock()

    def put(self, position: int, buf: bytearray) -> tuple[IndexEntry, int, int]:
        """Return (index entry, stored bytes if first use in this image, new bytes)."""
        digest = self.store.name(buf)
        with self._lock:
            claim = self._claimed.get(digest)
            first = claim is None
            if first:
                claim = self._claimed[digest] = concurrent.futures.Future()
        if not first:
            # The first claimant is already running (it took the lock first): waiting is safe.
            return IndexEntry(digest, claim.result()), 0, 0
        try:
            entry, stored, new = self._store(position, digest, buf)
        except BaseException as exc:
            claim.set_exception(exc)
            raise
        claim.set_result(entry.base)
        return entry, stored, new

    def _store(self, position: int, digest: str, buf: bytearray) -> tuple[IndexEntry, int, int]:
        # Size first, then touch: garbage collection may move an unreferenced
        # chunk aside at any moment and honours only a touch that landed
        # before; a chunk found gone is simply stored again. A delta is reused
        # only with its base, touched the same way. The file, not an index,
        # says what it needs: another backup may have stored it since.
        size = self._kept_size(digest)
        try:
            base = None if size is None else self.store.stored_base(digest)
        except ImageError:
            size = base = None  # gone since the touch: stored again below
        if size is not None and base is None:
            return IndexEntry(digest), self._count(digest, size), 0
        stored_delta = size is not None
        if stored_delta and not self._whole:
            base_size = self._kept_size(base)
            if base_size is not None:
                return (IndexEntry(digest, base),
                        self._count(digest, size) + self._count(base, base_size), 0)
        # A delta is nobody's base, so storing it again may replace it; any other
        # chunk file, once there, stays. In an encrypted store it is stored again
        # whole: the images that name it list its old base among their references
        # (what gc reads there without the key), never a new one.
        entry, frame, base_size = self._encode(
            position, digest, buf, whole=stored_delta and self.store.encrypted)
        size = self.batch.add(digest, frame, replace=stored_delta)
        stored = self._count(digest, size) + (self._count(entry.base, base_size)
                                              if entry.base else 0)
        return entry, stored, size

    def _encode(self, position: int, digest: str, buf: bytearray, *,
                whole: bool) -> tuple[IndexEntry, bytes, int]:
        """The entry and frame of a chunk to store, and its base's stored size (0 if none)."""
        base = None if whole else self._base_for(position, digest, len(buf))
        # A chunk set aside as corrupt may be some delta's base: stored again whole.
        base_size = self._kept_size(base) if base and not self.store.quarantined(digest) else None
        if base_size is not None:
            try:
                base_data = base_bytes(self.store, base, digest)
            except ImagingError:
                base_data = None  # a damaged base: the chunk is stored whole, verify names it
            if base_data is not None and codec.usable_as_base(base_data, len(buf)):
                delta = codec.compress_delta(buf, base_data, base, self.level)
                if len(delta) * 2 <= base_size:
                    return IndexEntry(digest, base), delta, base_size
                whole = codec.compress(buf, self.level)
                if len(whole) > len(delta) * REANCHOR_RATIO:
                    return IndexEntry(digest, base), delta, base_size
                return IndexEntry(digest), whole, 0
        return IndexEntry(digest), codec.compress(buf, self.level), 0

    def _kept_size(self, digest: str) -> Optional[int]:
        """The stored size of a chunk this image will need, touched; None if gone."""
        size = self._stored_size(digest)
        return size if size is not None and self.store.touch_chunk(digest) else None

    def _base_for(self, position: int, digest: str, length: int) -> Optional[str]:
        """The base for a changed chunk: none for zeros, which `zstd -dc` alone must restore."""
        zeros = self.store.zero_name(length)
        if position >= len(self._previous) or digest == zeros:
            return None
        before = self._previous[position]
        base = before.base or before.digest
        return None if base == zeros else base

    def _stored_size(self, digest: str) -> Optional[int]:
        try:
            return self.store.chunk_path(digest).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot look up chunk {digest}: {describe(exc)}") from None

    def _count(self, digest: str, size: int) -> int:
        """`size` the first time this image uses `digest`, else 0."""
        with self._lock:
            if digest in self._counted:
                return 0
            self._counted.add(digest)
            return size


def backup(source_path: str, store_dir: os.PathLike | str, *, disk_id: Optional[str] = None,
           level: int = codec.DEFAULT_LEVEL, mode: str = "raw", read_plan: Optional[ReadPlan] = None,
           progress: Optional[Progress] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
           workers: Optional[int] = None, force: bool = False,
           deltas: bool = True, expected_id: Optional[str] = None,
           encrypt_with: Optional[str] = None) -> BackupResult:
    """Image a disk into the datastore.

    `disk_id` files the image under that disk (default: the disk's own id).
    `encrypt_with`: the fingerprint of the key (held by the keyring) the datastore is
    encrypted with; a new one is created so, one of another key or none is refused.

    `expected_id`: the disk the caller believes is at `source_path`; another
    one found there (a disk plugged in where one was unplugged) is refused
    before anything is read or written.

    `deltas`: store changed chunks as deltas against the disk's previous
    image (see _ChunkSink). Their bases outlive the images that had them while
    a newer image needs them, so bytes a newer image no longer holds (deleted
    files' old blocks, in used mode) stay in the datastore until no delta
    refers to them; without deltas, pruning an image lets gc remove all of it.

    A disk with a partition mounted read-write is refused unless `force`: files
    change while it is read, so the image holds each part of the disk as it was
    at a different moment (and in used mode the block bitmaps that plan the
    read may be stale). A forced image records `mounted_rw`.
    """
    if mode not in MODES:
        raise ImagingError(f"unknown backup mode {mode!r}: use one of {', '.join(MODES)}")
    started = time.monotonic()
    identity = identify(source_path)
    if expected_id is not None and identity["id"] != expected_id:
        raise SourceError(f"{source_path} is disk {identity['id']} now, not the expected "
                          f"{expected_id}: nothing was read")
    disk_id = check_disk_id(disk_id or identity["id"])
    store = Datastore.open_or_create(store_dir, chunk_size, encrypt_with)
    with Source.open(source_path) as source:
        progress = progress or Progress("backup", source.size)
        progress.start_phase("backup", source.size)
        if mode == "used" and read_plan is None:
            used = usedmap.plan(source, force=force, cancelled=progress.cancelled)
            read_plan = used.wanted
            notes = used.manifest_extra()
        else:
            notes = _mount_notes(source_path, force)
        try:
            table = layout.dump(source_path)
        except SourceError as exc:
            # A failing disk may not let sfdisk read it; the sectors still matter more.
            table, notes["layout_error"] = None, str(exc)
        mbr, _ = source.read(0, min(layout.MBR_SIZE, source.size))
        writer = ImageWriter(store, disk_id)
        try:
            # Registered until the image is published: garbage collection must
            # never see this backup's chunks as neither a writer's nor an image's.
            with store.register("backup", f"backup {disk_id}", progress=progress):
                previous = previous_entries(store, disk_id) if deltas else None
                index, whole, bad = _copy_chunks(source, store, level, read_plan, progress, workers,
                                                 previous)
                identity["id"] = disk_id
                result = publish_image(
                    writer, identity=identity, size=source.size, sector_size=source.sector_size,
                    level=level, mode=mode, index=index, sha256=whole, bad=bad, mbr=bytes(mbr),
                    table=table, progress=progress, started=started, notes=notes)
        except BaseException:
            writer.discard()
            raise
    progress.finish()
    return result


def _mount_notes(source_path: str, force: bool) -> dict:
    """The manifest's note of a read-write mount a forced backup goes past; refused unforced."""
    mounted = usedmap.mounted_read_write(source_path)
    if mounted is None:
        return {}
    if not force:
        raise SourceInUse(f"{source_path} is mounted read-write ({mounted}): its image would "
                          "mix data written at different moments; unmount it, or force the "
                          "backup to take it anyway")
    return {"forced_past_mount": mounted}


def publish_image(writer: ImageWriter, *, identity: dict, size: int, sector_size: int, level: int,
                  mode: str, index: list[IndexEntry], sha256: str, bad: list[Range], mbr: bytes,
                  table: Optional[str], progress: Progress, started: float,
                  notes: Optional[dict] = None) -> BackupResult:
    """Write an image's files and manifest and publish it; the caller discards on failure.

    `notes`: the optional Manifest fields that apply to this image (a used
    mode's read map, a read-write mount a forced backup went past, ...).
    """
    store = writer.store
    notes = notes or {}
    index_text = writer.write_index(index)
    manifest = Manifest(
        disk=identity, size=size, chunk_size=store.chunk_size, sector_size=sector_size,
        sha256=sha256, created=utc_text(writer.created),
        seconds=round(time.monotonic() - started, 3), level=level,
        stored_bytes=progress.stored_bytes, new_bytes=progress.new_bytes,
        bad_bytes=sum(length for _, length in bad), mode=mode,
        status=STATUS_READ_ERRORS if bad else STATUS_COMPLETE, chunks=len(index),
        index_sha256=hashlib.sha256(index_text.encode()).hexdigest(),
        mounted_rw=notes.get("forced_past_mount") is not None, **notes)
    writer.write(layout.MBR_NAME, mbr)
    if table is not None:
        writer.write(layout.LAYOUT_NAME, table)
    writer.write(badmap.NAME, badmap.render(size, bad))
    writer.write(recipe.NAME, recipe.render(manifest, writer.final, store.fingerprint))
    image_dir = writer.commit(manifest)
    return BackupResult(image_dir, size, manifest.seconds, manifest.stored_bytes,
                        manifest.new_bytes, manifest.bad_bytes, sha256, manifest.status,
                        manifest.mounted_rw)


def previous_entries(store: Datastore, disk_id: str) -> list[IndexEntry]:
    """The index of the disk's newest readable image, what its changed chunks are deltas
    against; nothing in a format 1 datastore, which older engines must still read."""
    if not store.deltas:
        return []
    for path in reversed(store.image_dirs(disk_id)):
        try:
            return Image.open(path, store).entries()
        except ImageError:
            continue  # a damaged image is no base; verify reports it
    return []


def _copy_chunks(source: Source, store: Datastore, level: int, read_plan: Optional[ReadPlan],
                 progress: Progress, workers: Optional[int],
                 previous: Optional[Sequence[IndexEntry]]) -> tuple[list[IndexEntry], str, list[Range]]:
    def reads():
        for offset in range(0, source.size, store.chunk_size):
            length = min(store.chunk_size, source.size - offset)
            wanted = read_plan(offset, length) if read_plan else None
            yield source.read(offset, length, wanted, progress.cancelled)

    return store_chunks(reads(), store, level, progress, workers, previous)


def store_chunks(chunks: Iterable[tuple[bytearray, list[Range]]], store: Datastore, level: int,
                 progress: Progress, workers: Optional[int],
                 previous: Optional[Sequence[IndexEntry]] = (),
                 ) -> tuple[list[IndexEntry], str, list[Range]]:
    """Store a disk given as its chunks in order, each with its unreadable ranges.

    `previous`: the index of the disk's previous image, which changed chunks
    are stored as deltas against; None: no deltas at all (see _ChunkSink).
    Returns the index, the whole disk's SHA-256 and the unreadable ranges.
    """
    sink = _ChunkSink(store, level, previous)
    whole = hashlib.sha256()
    index: list[IndexEntry] = []
    bad: list[Range] = []
    stored = ordered_map(lambda item: sink.put(item[0], item[1][0]), enumerate(chunks),
                         workers=workers, cancelled=progress.cancelled, name="chunk")
    try:
        with contextlib.closing(stored):
            for (_, (buf, chunk_bad)), (entry, stored_bytes, new_bytes) in stored:
                if sink.batch.due():
                    sink.batch.flush()
                whole.update(buf)
                index.append(entry)
                bad.extend(chunk_bad)
                progress.advance(len(buf), bad=sum(n for _, n in chunk_bad),
                                 stored=stored_bytes, new=new_bytes)
        sink.batch.flush()
    except BaseException:
        sink.batch.discard()
        raise
    return index, whole.hexdigest(), bad
