"""The catalog: a datastore's images as typed records, and what the datastore holds.

Listing reads each image's manifest.json, verification record and partition
table, and its read-error map if it has read errors, nothing else (no index),
so thousands of images list in a second or so. An image that cannot be read is
listed with the reason instead of failing the whole listing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ..base.errors import ImagingError, StoreError, translated
from ..disks import layout
from . import badmap
from .codec import DIGEST_RE
from .image import Image, protection
from .keyring import KeyNeeded
from .store import CHUNK_SUFFIX, SUMMARY_NAME, Datastore, check_disk_id
from .verification import VerifyResult


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image as the catalog lists it; `error` says why the rest is unknown."""

    disk_id: str
    stamp: str
    path: str
    disk: Optional[dict] = None  # identity: id, model, serial, wwn, size, path, host
    size: Optional[int] = None
    mode: Optional[str] = None
    status: Optional[str] = None
    level: Optional[int] = None
    sha256: Optional[str] = None
    created: Optional[str] = None  # UTC, ISO 8601
    seconds: Optional[float] = None
    stored_bytes: Optional[int] = None
    new_bytes: Optional[int] = None
    bad_bytes: Optional[int] = None
    mounted_rw: Optional[bool] = None
    verified: bool = False  # a verification is recorded
    verified_at: Optional[str] = None  # when it ended, UTC, ISO 8601
    verify_ok: Optional[bool] = None  # whether it found every chunk intact
    # A restore drill's (verify --fsck) findings, {"number", "type", "result": "clean",
    # "dirty" or "not checked", "detail"} per partition; None if the last verification had none.
    filesystems: Optional[list[dict]] = None
    # What the disk held: {"name", "start", "size" (bytes), "type", "fstype", "label"} each,
    # from layout.sf; the filesystem is known where a used-mode backup probed it.
    partitions: Optional[list[dict]] = None
    # Where its read errors are, [offset, length] in bytes, at most MAX_BAD_RANGES spans.
    bad_ranges: Optional[list[list[int]]] = None
    # In an encrypted datastore; listed without its key, only its summary's fields are known.
    encrypted: bool = False
    # {"at", "note"} while protected from prune and deletion.
    protected: Optional[dict] = None
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DatastoreUsage:
    path: str
    total_bytes: int  # of the filesystem holding the datastore
    free_bytes: int  # available to this process on it
    chunk_count: int
    chunk_bytes: int  # compressed, as stored
    image_count: int  # readable images
    logical_bytes: int  # the sum of their disk sizes
    fingerprint: str  # of the key it is encrypted with; "" for a plain store

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The fields of an encrypted image's summary the catalog shows without the key.
SUMMARY_SHOWN = ("size", "mode", "status", "level", "created", "seconds", "stored_bytes",
                 "new_bytes", "bad_bytes")


def list_images(store_dir: os.PathLike | str, disk_id: Optional[str] = None) -> list[ImageRecord]:
    """Every image of the datastore (of one disk if `disk_id`), by disk, oldest first."""
    store = Datastore.open(store_dir)
    if disk_id is not None:
        check_disk_id(disk_id)
    return [_record(store, path) for path in store.image_dirs(disk_id)]


def _record(store: Datastore, path: Path) -> ImageRecord:
    where = ImageRecord(path.parent.name, path.name, str(path), encrypted=store.encrypted)
    try:
        image = Image.open(path, store)
    except KeyNeeded:
        return _summary_record(where, path)
    except ImagingError as exc:
        return dataclasses.replace(where, error=str(exc))
    manifest = image.manifest
    record = dataclasses.replace(
        where, disk=manifest.identity(), size=manifest.size, mode=manifest.mode,
        status=manifest.status, level=manifest.level, sha256=manifest.sha256,
        created=manifest.created, seconds=manifest.seconds, stored_bytes=manifest.stored_bytes,
        new_bytes=manifest.new_bytes, bad_bytes=manifest.bad_bytes,
        mounted_rw=manifest.mounted_rw, partitions=_partitions(image),
        bad_ranges=_bad_ranges(image) if manifest.bad_bytes else [])
    return _verification(record, path)


def _summary_record(where: ImageRecord, path: Path) -> ImageRecord:
    """An encrypted image, listed without its key: what its summary shows."""
    try:
        summary = json.loads((path / SUMMARY_NAME).read_bytes())
        shown = {name: summary[name] for name in SUMMARY_SHOWN}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return dataclasses.replace(where, error=f"{path / SUMMARY_NAME}: unreadable ({exc})")
    return _verification(dataclasses.replace(where, **shown), path)


def _verification(record: ImageRecord, path: Path) -> ImageRecord:
    """The record with what the image's plain files add: protection, the last verification."""
    record = dataclasses.replace(record, protected=protection(path))
    try:
        verification = VerifyResult.read(path)
    except ImagingError as exc:
        return dataclasses.replace(record, error=str(exc))
    if verification is None:
        return record
    filesystems = verification.filesystems
    return dataclasses.replace(record, verified=True, verified_at=verification.at,
                               verify_ok=verification.ok,
                               filesystems=None if filesystems is None else
                               [check.as_dict() for check in filesystems])


# A read-error map is shown as a strip across the disk: finer spans than this add nothing.
MAX_BAD_RANGES = 1000


def _partitions(image: Image) -> Optional[list[dict]]:
    """The partitions layout.sf lists, [] without a table, None if it cannot be read."""
    try:
        text = image.read_file(layout.LAYOUT_NAME).decode()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ImagingError):
        return None
    manifest = image.manifest
    return layout.parse_dump(text, manifest.sector_size, manifest.partitions or [])


def _bad_ranges(image: Image) -> Optional[list[list[int]]]:
    size = image.size
    try:
        bad = badmap.parse_bad(image.read_file(badmap.NAME).decode())
    except (OSError, UnicodeDecodeError, ValueError, ImagingError):
        return None
    if len(bad) > MAX_BAD_RANGES:
        # One span per 1/MAX_BAD_RANGES of the disk, covering the errors inside it.
        spans: dict[int, list[int]] = {}
        for start, length in bad:
            bucket = start * MAX_BAD_RANGES // max(size, 1)
            low, high = spans.get(bucket, (start, start + length))
            spans[bucket] = [min(low, start), max(high, start + length)]
        bad = [(low, high - low) for low, high in spans.values()]
    return [[start, length] for start, length in bad]


def datastore_usage(store_dir: os.PathLike | str) -> DatastoreUsage:
    """The datastore's filesystem space, its chunks and its images."""
    store = Datastore.open(store_dir)
    with translated(StoreError, f"cannot measure datastore {store.root}"):
        space = os.statvfs(store.root)
        chunk_count, chunk_bytes = _chunks(store)
    images = [record for record in list_images(store.root) if record.size is not None]
    return DatastoreUsage(str(store.root), space.f_blocks * space.f_frsize,
                          space.f_bavail * space.f_frsize, chunk_count, chunk_bytes,
                          len(images), sum(record.size for record in images),
                          store.fingerprint or "")


def _chunks(store: Datastore) -> tuple[int, int]:
    """(number, bytes) of the stored chunks; set-aside and temporary files are not chunks."""
    count = size = 0
    for folder in store.chunk_dirs():
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(CHUNK_SUFFIX) or \
                        not DIGEST_RE.match(entry.name[:-len(CHUNK_SUFFIX)]):
                    continue
                try:
                    size += entry.stat().st_size
                except FileNotFoundError:
                    continue  # collected meanwhile
                count += 1
    return count, size
