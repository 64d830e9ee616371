"""Starting jobs: validate the request, create the queued row, enqueue it on commit.

A job goes to the queue of the host whose worker must run it. A disk takes one
job at a time: the check runs in the transaction that creates the job, with
the disks locked, so of two requests for one disk only one can win. A job
whose message Redis does not take is failed at once (services.delivery).
"""
from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Iterable, Optional

from django.conf import settings
from django.db import transaction
from django.db.models import Q

import imaging.codec
import imaging.mount
import imaging.store
from imaging.errors import ImagingError

from ..models import Datastore, Disk, Host, HostAccess, Image, Job, Schedule
from . import delivery
from .catalog import default_datastore
from .errors import Refused
from .files import partitions

BACKUP_MODES = ("raw", "used")
PRUNE_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def start_backup(disk: Disk, user=None, *, mode: Optional[str] = None, level: Optional[int] = None,
                 datastore: Optional[Datastore] = None, schedule: Optional[Schedule] = None,
                 force: bool = False, deltas: Optional[bool] = None) -> Job:
    """Back a disk up now; without a schedule, as the disk's backup schedule would."""
    disk = _inventoried(disk, "disk")
    template = schedule or disk.backup_schedule()
    mode = mode or (template.mode if template else "raw")
    level = level if level is not None else (template.level if template else imaging.codec.DEFAULT_LEVEL)
    datastore = datastore or (template.datastore if template else default_datastore())
    deltas = deltas if deltas is not None else (template.deltas if template else True)
    if mode not in BACKUP_MODES:
        raise Refused(f"unknown backup mode {mode!r}: use raw or used")
    _check_level(level)
    return _create_job(Job.Kind.BACKUP, disk.host, user, disk=disk, datastore=datastore,
                       schedule=schedule,
                       params={"mode": mode, "level": level, "force": force, "deltas": deltas},
                       holds=[disk])


def start_restore(image: Image | int, target_disk: Disk | int | str, confirm: Any, user=None, *,
                  partition: Any = None) -> Job:
    """Write an image (or only its partition number `partition`) onto an inventoried disk of
    some host, once confirmed by its stable id."""
    image = _image(image)
    target = _inventoried(target_disk, "target disk")
    part = None if partition is None else _image_partition(image, partition)
    problem = target.restore_problem(image, part)
    if problem is not None:
        raise Refused(f"target disk {target.stable_id} is {problem}")
    if confirm != target.stable_id:
        raise Refused(f"to overwrite disk {target.stable_id}, confirm with its id "
                      f"{target.stable_id!r}")
    params = {"verify": True} if partition is None else {"verify": True, "partition": partition}
    return _create_job(Job.Kind.RESTORE, target.host, user, disk=image.disk, image=image,
                       target_disk=target, datastore=image.datastore, params=params,
                       holds=[target])


def _image_partition(image: Image, number: Any):
    if isinstance(number, bool) or not isinstance(number, int):
        raise Refused(f"a partition is named by its number, not {number!r}")
    try:
        return imaging.mount.numbered(partitions(image), number, "the image")
    except ImagingError as missing:
        raise Refused(str(missing)) from None


def start_verify(image: Image | int, user=None, schedule: Optional[Schedule] = None) -> Job:
    image = _image(image)
    return _create_job(Job.Kind.VERIFY, _datastore_host(image.datastore, image.disk.host), user,
                       disk=image.disk, image=image, datastore=image.datastore, schedule=schedule)


def start_verify_latest(datastore: Datastore, user=None,
                        schedule: Optional[Schedule] = None) -> list[Job]:
    """Verify the newest image of each disk in the datastore (what a verify schedule runs)."""
    return [start_verify(image, user, schedule=schedule) for image in latest_images(datastore)]


def latest_images(datastore: Datastore) -> list[Image]:
    latest: dict[int, Image] = {}
    for image in (Image.objects.filter(datastore=datastore)
                  .select_related("disk__host", "datastore").order_by("disk_id", "-created")):
        latest.setdefault(image.disk_id, image)
    return list(latest.values())


def start_recompress(image: Image | int, level: int, user=None) -> Job:
    image = _image(image)
    _check_level(level)
    return _create_job(Job.Kind.RECOMPRESS, _datastore_host(image.datastore, image.disk.host), user,
                       disk=image.disk, image=image, datastore=image.datastore,
                       params={"level": level})


def start_export(image: Image | int, name: str, user=None, *, level: int = imaging.codec.DEFAULT_LEVEL,
                 long_distance: bool = False, split_size: Optional[int] = None,
                 host: Optional[Host] = None) -> Job:
    """Export an image as one zstd stream into EXPORT_DIR of `host` (this host by default)."""
    image = _image(image)
    _check_level(level)
    if split_size is not None and split_size <= 0:
        raise Refused(f"part size {split_size} must be positive")
    return _create_job(Job.Kind.EXPORT, host or _local_host(), user, disk=image.disk, image=image,
                       datastore=image.datastore, params={
                           "name": _plain_name(name, "export name"), "level": level,
                           "long_distance": long_distance, "split_size": split_size})


def start_import(files: Iterable[str], disk_id: str, user=None, *,
                 datastore: Optional[Datastore] = None, level: int = imaging.codec.DEFAULT_LEVEL,
                 host: Optional[Host] = None) -> Job:
    """Import a classic backup lying in IMPORT_DIR of `host` (this host by default)."""
    names = [_relative_name(name) for name in files]
    if not names:
        raise Refused("name the archive to import")
    try:
        imaging.store.check_disk_id(disk_id)
    except ImagingError as exc:
        raise Refused(str(exc)) from None
    _check_level(level)
    return _create_job(Job.Kind.IMPORT, host or _local_host(), user,
                       disk=Disk.objects.filter(stable_id=disk_id).first(),
                       datastore=datastore or default_datastore(),
                       params={"files": names, "disk_id": disk_id, "level": level})


def start_prune(schedule: Optional[Schedule] = None, *, disk: Optional[Disk] = None,
                retention: Optional[dict[str, int]] = None, datastore: Optional[Datastore] = None,
                user=None) -> Job:
    """Apply a backup schedule's retention to its disk's images (or the retention given)."""
    if schedule is not None:
        disk, datastore = schedule.disk, schedule.datastore
        retention = schedule.retention()
    if disk is None or retention is None:
        raise Refused("prune needs a backup schedule, or a disk and a retention")
    datastore = datastore or default_datastore()
    unknown = set(retention) - set(PRUNE_RULES)
    if unknown:
        raise Refused(f"unknown retention rule(s) {', '.join(sorted(unknown))}: "
                      f"use {', '.join(PRUNE_RULES)}")
    if any(not isinstance(count, int) or count < 0 for count in retention.values()):
        raise Refused("each retention count must be a whole number, 0 or more")
    if not any(retention.values()):
        raise Refused("a retention that keeps nothing would remove every image")
    return _create_job(Job.Kind.PRUNE, _datastore_host(datastore, disk.host), user, disk=disk,
                       datastore=datastore, schedule=schedule,
                       params={"retention": retention, "time_zone": schedule.time_zone
                               if schedule else settings.TIME_ZONE})


def start_gc(datastore: Datastore, user=None, schedule: Optional[Schedule] = None) -> Job:
    return _create_job(Job.Kind.GC, _datastore_host(datastore), user, datastore=datastore,
                       schedule=schedule)


def _create_job(kind: str, host: Host, user, *, holds: Iterable[Disk] = (), **fields) -> Job:
    """Create a queued job and enqueue it on commit; refused if a disk it holds is busy,
    Unavailable (the job failed, its disks free) if Redis does not take its message.

    The disks are locked first (select_for_update; SQLite's IMMEDIATE transactions
    serialize writers), so of two requests for one disk only one can win.
    """
    holds = list(holds)
    if HostAccess.objects.filter(host=host, revoked_at__isnull=False).exists():
        raise Refused(f"host {host.name}'s access was revoked: it runs no jobs until it joins "
                      "again")
    with transaction.atomic():
        list(Disk.objects.select_for_update().filter(pk__in=[disk.pk for disk in holds]))
        busy = (Job.objects.filter(state__in=Job.ACTIVE_STATES)
                .filter(Q(kind=Job.Kind.BACKUP, disk__in=holds) | Q(target_disk__in=holds))
                .select_related("disk", "target_disk").first()) if holds else None
        if busy is not None:
            held = next(d for d in holds if d.pk in (busy.disk_id, busy.target_disk_id))
            raise Refused(f"disk {held.stable_id} is busy with {busy.kind} job #{busy.pk} "
                          f"({busy.state}): one job per disk at a time")
        note = "" if host.is_online() else (
            f"host {host.name} is offline: the job waits in its queue until its worker is back")
        job = Job.objects.create(kind=kind, host=host, requested_by=requester(user), note=note,
                                 **fields)
        _enqueue(job)
    return job


def _enqueue(job: Job) -> None:
    # Once committed, so the worker finds the row; a job that cannot be sent is failed then,
    # and Unavailable raised where the transaction commits (outside any, for every caller).
    transaction.on_commit(lambda: delivery.send(job))
    announce(job)


def _inventoried(disk: Disk | int | str, what: str) -> Disk:
    """The present, inventoried disk a request names by its database id (never by a path)."""
    if not isinstance(disk, Disk):
        if isinstance(disk, bool) or not isinstance(disk, (int, str)) or not str(disk).isdigit():
            raise Refused(f"{what} must be a disk's id (a number), not {disk!r}")
        found = Disk.objects.select_related("host").filter(pk=int(disk)).first()
        if found is None:
            raise Refused(f"no {what} with id {disk}")
        disk = found
    if not disk.present:
        raise Refused(f"{what} {disk.stable_id} is gone: host {disk.host.name} no longer reports it")
    return disk


def _image(image: Image | int) -> Image:
    if isinstance(image, Image):
        return image
    if isinstance(image, bool) or not isinstance(image, (int, str)) or not str(image).isdigit():
        raise Refused(f"an image is named by its id (a number), not {image!r}")
    found = Image.objects.select_related("disk__host", "datastore").filter(pk=int(image)).first()
    if found is None:
        raise Refused(f"no image with id {image}")
    return found


def _check_level(level: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or level not in imaging.codec.LEVELS:
        raise Refused(f"compression level {level!r} is not a zstd level "
                      f"({imaging.codec.LEVELS.start}-{imaging.codec.LEVELS.stop - 1})")


def _plain_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}", name):
        raise Refused(f"{what} {name!r}: use letters, digits and ._+- only, no folders")
    return name


def _relative_name(name: str) -> str:
    """A file below IMPORT_DIR: relative, no '..', so a request cannot read elsewhere."""
    path = PurePath(name) if isinstance(name, str) else None
    if path is None or not name or path.is_absolute() or ".." in path.parts:
        raise Refused(f"{name!r}: name a file inside the import folder, relative to it")
    return str(path)


def requester(user):
    return user if user is not None and getattr(user, "is_authenticated", False) else None


def _local_host() -> Host:
    host, _ = Host.objects.get_or_create(name=settings.HOST_NAME)
    return host


def _datastore_host(datastore: Datastore, preferred: Optional[Host] = None) -> Host:
    """Whose worker runs a job on a datastore: `preferred` if online, else a host online
    with a present disk backed up there, else `preferred`, else this host."""
    if preferred is not None and preferred.is_online():
        return preferred
    candidates = list(Host.objects.filter(disks__present=True, disks__images__datastore=datastore)
                      .distinct().order_by("-last_seen"))
    for host in candidates:
        if host.is_online():
            return host
    if preferred is not None:
        return preferred
    return candidates[0] if candidates else _local_host()


def announce(job: Job) -> None:
    """Tell browsers of the job's new state once the transaction that made it commits."""
    from ..progress import send_job_state

    transaction.on_commit(lambda: send_job_state(job))


def reloaded(job: Job) -> Job:
    return (Job.objects.select_related("host", "disk", "image__datastore", "target_disk",
                                       "datastore", "schedule").get(pk=job.pk))
