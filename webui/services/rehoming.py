"""Disks an older engine named without their host: each host's disk takes back its share.

One such Disk row (`dev-vda`) stood for every host's /dev/vda. Its images move
to each host's own disk in the datastore (imaging.rehome, by what each image's
manifest says of its host), and the catalog follows (store_catalog keeps each
moved image's row). Its jobs go to the disk of the host that ran them, or
follow their image; its schedules to the disk of the host it was last reported
by, with a copy for each other host's disk known by then (one schedule backed
up whichever host had last reported, so each was in fact covered by it); its
protection history to the first. The row goes once nothing names it.

Every worker runs this after each inventory report. A datastore that cannot be
read (not mounted here, or not yet) keeps its images on the old row, whole, and
is tried again on the next round, by any host that has it.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Optional

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

import imaging.disks.inventory
import imaging.rehome
from imaging.base.errors import ImagingError

from ..models import Datastore, Disk, Host, Image, Job, Schedule, StatusChange
from .catalog import read_catalog, store_catalog
from .errors import Refused
from .protection import update_alert
from .schedules import sync_schedule

log = logging.getLogger(__name__)

# Datastore path -> the images a round left on host-less disks for good (their manifest names
# no host): this process reads that datastore again only once they are others.
_settled: dict[str, set[int]] = {}


def rehome_host_less_disks(now: Optional[dt.datetime] = None) -> None:
    now = now or timezone.now()
    rows = host_less_disks()
    for datastore in Datastore.objects.filter(images__disk__in=rows).distinct():
        if _settled.get(datastore.path) == _waiting(datastore, rows):
            continue
        try:
            result = imaging.rehome.rehome(datastore.path)
            records, usage = read_catalog(datastore)
        except (ImagingError, Refused) as exc:
            log.info("images of host-less disk ids in %s stay for now: %s", datastore, exc)
            continue
        for problem in result.left:
            log.warning("image left under its host-less disk id: %s", problem)
        with transaction.atomic():
            store_catalog(datastore, records, usage, now=now)
        if not result.deferred:
            _settled[datastore.path] = _waiting(datastore, rows)
    for disk in rows:
        with transaction.atomic():
            _hand_over(disk, now)


def _waiting(datastore: Datastore, rows: list[Disk]) -> set[int]:
    return set(Image.objects.filter(datastore=datastore, disk__in=rows)
               .values_list("pk", flat=True))


def host_less_disks() -> list[Disk]:
    """The Disk rows an older engine named without their host."""
    maybe = Disk.objects.select_related("host").filter(
        Q(stable_id__startswith="dev-") | Q(stable_id__contains="QEMU")
        | Q(model__startswith="QEMU"))
    return [disk for disk in maybe if imaging.disks.inventory.host_less(disk.stable_id, disk.model)]


def _successor_id(disk: Disk, host: Host) -> Optional[str]:
    return imaging.disks.inventory.rehomed_id(disk.stable_id, {
        "host": host.name, "model": disk.model, "serial": disk.serial, "path": disk.path})


def _successor(disk: Disk, host: Host) -> Optional[Disk]:
    """The disk `disk` stands for on `host`; made, gone, if its host has not reported it."""
    stable_id = _successor_id(disk, host)
    if stable_id is None:
        return None
    successor, _ = Disk.objects.get_or_create(stable_id=stable_id, defaults={
        "host": host, "present": False, "model": disk.model, "serial": disk.serial,
        "wwn": disk.wwn, "size": disk.size, "sector_size": disk.sector_size, "path": disk.path,
        "kind": disk.kind})
    return successor


def _hand_over(disk: Disk, now: dt.datetime) -> None:
    # Another host's worker may be handing it over too: one at a time, the second finds it done.
    disk = Disk.objects.select_for_update().select_related("host").filter(pk=disk.pk).first()
    if disk is None or _successor_id(disk, disk.host) is None:
        return
    touched = set()
    for job in Job.objects.filter(disk=disk).select_related("host", "image"):
        if job.image_id is None:
            job.disk = _successor(disk, job.host)
        elif job.image.disk_id != disk.pk:
            job.disk = job.image.disk
        else:
            continue  # follows its image, once that has moved
        job.save(update_fields=["disk"])
        touched.add(job.disk)
    for job in Job.objects.filter(target_disk=disk).select_related("host"):
        job.target_disk = _successor(disk, job.host)
        job.save(update_fields=["target_disk"])
    schedules = list(Schedule.objects.filter(disk=disk))
    flips = StatusChange.objects.filter(disk=disk)
    if schedules or flips.exists():
        home = _successor(disk, disk.host)
        others = list(Disk.objects.select_related("host").filter(stable_id__in=[
            _successor_id(disk, host) for host in Host.objects.exclude(pk=disk.host_id)]))
        touched.update([home, *others])
        for schedule in schedules:
            for other in others:
                copy = Schedule.objects.get(pk=schedule.pk)
                copy.pk, copy.disk, copy.periodic_task = None, other, None
                copy.save()
                sync_schedule(copy)
                log.warning("%s copied from %s for %s", copy, disk.stable_id, other.host.name)
            schedule.disk = home
            schedule.save(update_fields=["disk"])
            sync_schedule(schedule)
        flips.update(disk=home)
    if not (disk.images.exists() or disk.jobs.exists() or disk.restore_jobs.exists()):
        disk.delete()
    for successor in touched:
        update_alert(successor, now)
