"""What exists: hosts and their disks as workers report them, images as datastores hold them.

The datastore is the source of truth for images: the catalog is rebuilt from
the engine's listing of it, never edited by hand.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

import imaging.datastore.catalog
import imaging.disks.inventory
import imaging.prune
import imaging.datastore.store
from imaging.base.errors import ImagingError

from ..models import HOST_NAME_RE, Datastore, Disk, Host, Image, Job
from .errors import Refused
from .protection import update_alert


def report_inventory(host_name: str, worker: str, disks: Iterable[dict],
                     now: Optional[dt.datetime] = None) -> Host:
    """Record what a host's worker sees: the host is online, these disks are present.

    Disks are matched by stable id, so a disk that moved to another port or
    another host keeps its history; a disk no longer reported stays, not present.
    """
    now = now or timezone.now()
    disks = list(disks)
    with transaction.atomic():
        host, _ = Host.objects.get_or_create(name=host_name)
        host.worker, host.last_seen = worker, now
        host.save(update_fields=["worker", "last_seen"])
        for disk in disks:
            Disk.objects.update_or_create(stable_id=disk["id"], defaults={
                "host": host, "model": disk.get("model") or "", "serial": disk.get("serial") or "",
                "wwn": disk.get("wwn") or "", "size": disk.get("size") or 0,
                "sector_size": disk.get("sector_size") or 512, "path": disk.get("path") or "",
                "kind": disk.get("type") or "", "present": True,
                "mounted": bool(disk.get("mounted")), "mountpoints": disk.get("mountpoints") or [],
                "read_only": bool(disk.get("read_only")),
                "partitions": disk.get("partitions") or [], "last_seen": now,
            })
        (Disk.objects.filter(host=host, present=True)
         .exclude(stable_id__in=[disk["id"] for disk in disks]).update(present=False))
    return host


def report_local_inventory(worker: str) -> Host:
    """Run the engine's inventory on this host and record it."""
    try:
        disks = imaging.disks.inventory.inventory()
    except ImagingError as exc:
        raise Refused(f"no inventory of host {settings.HOST_NAME}: {exc}") from exc
    return report_inventory(settings.HOST_NAME, worker, disks)


def datastore_at(path: os.PathLike | str) -> Datastore:
    datastore, _ = Datastore.objects.get_or_create(path=os.path.abspath(os.fspath(path)))
    return datastore


def default_datastore() -> Datastore:
    return datastore_at(settings.IMAGING_DATASTORE)


@dataclasses.dataclass
class CatalogChange:
    images: int  # images the datastore holds (of the disk, if one was named)
    added: int
    removed: int
    unreadable: list[str]  # "path: why" of each image the engine could not read


def rescan(datastore_path: os.PathLike | str) -> CatalogChange:
    """Rebuild the catalog of a datastore from the datastore itself (idempotent)."""
    datastore = datastore_at(datastore_path)
    records, usage = read_catalog(datastore)
    with transaction.atomic():
        return store_catalog(datastore, records, usage)


def delete_image(image: Image) -> CatalogChange:
    """Remove one image from its datastore now; its chunks stay until garbage collection.

    Refused while a job of ours uses it, or a job on any host reads it (the
    datastore's registrations say so). The disk's catalog is read again after.
    """
    busy = image.jobs.filter(state__in=Job.ACTIVE_STATES).first()
    if busy is not None:
        raise Refused(f"image {image} is in use by {busy.kind} job #{busy.pk} ({busy.state}): "
                      "delete it once that job is done")
    datastore, disk_id = image.datastore, image.disk.stable_id
    path = Path(image.path)
    try:
        store = imaging.datastore.store.Datastore.open(datastore.path)
        if path.is_dir():
            with store.pruning():
                reader = imaging.prune.remove_image(store, path)
            if reader is not None:
                raise Refused(f"image {image} is being read by {reader.what} on {reader.host}: "
                              "delete it once that job is done")
    except ImagingError as exc:
        raise Refused(str(exc)) from exc
    records, usage = read_catalog(datastore, disk_id)
    with transaction.atomic():
        return store_catalog(datastore, records, usage, disk_id=disk_id)


def read_catalog(datastore: Datastore, disk_id: Optional[str] = None,
                  images: bool = True) -> tuple[Optional[list], Any]:
    """What the engine's catalog says: (image records, or None if not asked; usage).

    Read before any transaction opens: listing a large datastore takes a while,
    and an SQLite write transaction holds every other writer meanwhile.
    """
    try:
        records = imaging.datastore.catalog.list_images(datastore.path, disk_id) if images else None
        return records, imaging.datastore.catalog.datastore_usage(datastore.path)
    except ImagingError as exc:
        raise Refused(str(exc)) from exc


def store_catalog(datastore: Datastore, records: Optional[list], usage: Any,
                   disk_id: Optional[str] = None, now: Optional[dt.datetime] = None) -> CatalogChange:
    """Make the datastore's Image rows (all, or one disk's) what the catalog listed."""
    now = now or timezone.now()
    for name in ("total_bytes", "free_bytes", "chunk_count", "chunk_bytes", "image_count",
                 "logical_bytes", "fingerprint"):
        setattr(datastore, name, getattr(usage, name))
    datastore.scanned_at = now
    datastore.save()
    if records is None:
        return CatalogChange(usage.image_count, 0, 0, [])
    readable = [record for record in records if record.error is None]
    disks = _disks_for(readable)
    existing = Image.objects.filter(datastore=datastore)
    if disk_id is not None:
        existing = existing.filter(disk__stable_id=disk_id)
    existing = {image.path: image for image in existing}
    moved = _moved_rows(datastore, [record for record in readable if record.path not in existing])
    for image in moved.values():
        existing.pop(image.path, None)
    touched = {image.disk_id for image in moved.values()}
    fresh, changed = [], []
    for record in readable:
        image = (existing.pop(record.path, None) or moved.get(record.path)
                 or Image(datastore=datastore, path=record.path))
        image.path = record.path
        _copy_record(image, record, disks[record.disk_id])
        (changed if image.pk else fresh).append(image)
    Image.objects.bulk_create(fresh, batch_size=500)
    Image.objects.bulk_update(changed, IMAGE_FIELDS, batch_size=500)
    gone = [image.pk for image in existing.values()]
    for start in range(0, len(gone), 500):
        Image.objects.filter(pk__in=gone[start:start + 500]).delete()
    touched |= {disks[record.disk_id].pk for record in readable}
    touched |= {image.disk_id for image in existing.values()}
    for disk in Disk.objects.filter(pk__in=touched):
        update_alert(disk, now)
    return CatalogChange(len(readable), len(fresh), len(gone),
                         [f"{record.path}: {record.error}" for record in records if record.error])


def _moved_rows(datastore: Datastore, records: list) -> dict:
    """The rows of images moved to another disk's folder (imaging.rehome), by new path: same
    stamp and content, old folder gone. Kept, with the jobs that name them."""
    stamps = sorted({record.stamp for record in records})
    gone = {}
    for start in range(0, len(stamps), 500):
        for image in Image.objects.filter(datastore=datastore, stamp__in=stamps[start:start + 500]):
            if not os.path.exists(image.path):
                gone[(image.stamp, image.sha256)] = image
    return {record.path: image for record in records
            if (image := gone.pop((record.stamp, record.sha256), None)) is not None}


IMAGE_FIELDS = ["path", "disk", "stamp", "mode", "status", "size", "stored_bytes", "new_bytes",
                "bad_bytes", "sha256", "level", "created", "seconds", "mounted_rw",
                "verified_at", "verify_ok", "filesystems", "partitions", "bad_ranges", "encrypted",
                "protected"]


def _copy_record(image: Image, record, disk: Disk) -> None:
    image.disk, image.stamp = disk, record.stamp
    image.mode, image.status, image.level = record.mode, record.status, record.level
    # An encrypted image listed without its key shows no SHA-256 (docs/architecture.md,
    # "Encrypted datastores": the web server never holds a key).
    image.size, image.sha256 = record.size, record.sha256 or ""
    image.stored_bytes, image.new_bytes = record.stored_bytes, record.new_bytes
    image.bad_bytes, image.seconds = record.bad_bytes, record.seconds
    image.mounted_rw = bool(record.mounted_rw)
    image.created = parse_datetime(record.created)
    image.verified_at = parse_datetime(record.verified_at) if record.verified_at else None
    image.verify_ok, image.filesystems = record.verify_ok, record.filesystems
    image.partitions = record.partitions or []
    image.bad_ranges = record.bad_ranges or []
    image.encrypted, image.protected = record.encrypted, record.protected


def _disks_for(records: list) -> dict[str, Disk]:
    """The Disk of each record's disk id; one the inventory never reported is created gone,
    on the host its manifest names, so its images have a home until its host reports it."""
    ids = {record.disk_id for record in records}
    disks = {disk.stable_id: disk for disk in Disk.objects.filter(stable_id__in=ids)}
    for record in records:
        if record.disk_id in disks:
            continue
        identity = record.disk or {}
        host_name = identity.get("host") or ""
        if not re.match(HOST_NAME_RE, host_name):
            host_name = settings.HOST_NAME
        host, _ = Host.objects.get_or_create(name=host_name)
        disks[record.disk_id] = Disk.objects.create(
            host=host, stable_id=record.disk_id, present=False, model=identity.get("model") or "",
            serial=identity.get("serial") or "", wwn=identity.get("wwn") or "",
            size=identity.get("size") or record.size or 0, path=identity.get("path") or "")
    return disks
