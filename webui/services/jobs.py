"""What starting a job needs whatever its kind: the things a request names, looked up and
checked; which host runs a job on a datastore; the job announced as it changes.

A job goes to the queue of the host whose worker must run it. A job whose message Redis does
not take is failed at once (services.delivery). What each kind takes and checks is its entry
in services/kinds.py.
"""
from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Optional

from django.conf import settings
from django.db import transaction

import imaging.reading.mount
from imaging.base.errors import ImagingError

from ..models import Datastore, Disk, Host, Image, Job
from ..progress import send_job_state
from .errors import Refused
from .files import partitions


def inventoried(disk: Disk | int | str, what: str) -> Disk:
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


def image_named(image: Image | int) -> Image:
    if isinstance(image, Image):
        return image
    if isinstance(image, bool) or not isinstance(image, (int, str)) or not str(image).isdigit():
        raise Refused(f"an image is named by its id (a number), not {image!r}")
    found = Image.objects.select_related("disk__host", "datastore").filter(pk=int(image)).first()
    if found is None:
        raise Refused(f"no image with id {image}")
    return found


def image_partition(image: Image, number: Any):
    if isinstance(number, bool) or not isinstance(number, int):
        raise Refused(f"a partition is named by its number, not {number!r}")
    try:
        return imaging.reading.mount.numbered(partitions(image, volumes=False), number,
                                              "the image")
    except ImagingError as missing:
        raise Refused(str(missing)) from None


def latest_images(datastore: Datastore) -> list[Image]:
    latest: dict[int, Image] = {}
    for image in (Image.objects.filter(datastore=datastore)
                  .select_related("disk__host", "datastore").order_by("disk_id", "-created")):
        latest.setdefault(image.disk_id, image)
    return list(latest.values())


def plain_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}", name):
        raise Refused(f"{what} {name!r}: use letters, digits and ._+- only, no folders")
    return name


def relative_name(name: str) -> str:
    """A file below IMPORT_DIR: relative, no '..', so a request cannot read elsewhere."""
    path = PurePath(name) if isinstance(name, str) else None
    if path is None or not name or path.is_absolute() or ".." in path.parts:
        raise Refused(f"{name!r}: name a file inside the import folder, relative to it")
    return str(path)


def requester(user):
    return user if user is not None and getattr(user, "is_authenticated", False) else None


def local_host() -> Host:
    host, _ = Host.objects.get_or_create(name=settings.HOST_NAME)
    return host


def datastore_host(datastore: Datastore, preferred: Optional[Host] = None) -> Host:
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
    return candidates[0] if candidates else local_host()


def announce(job: Job) -> None:
    """Tell browsers of the job's new state once the transaction that made it commits."""
    transaction.on_commit(lambda: send_job_state(job))


def reloaded(job: Job) -> Job:
    return (Job.objects.select_related("host", "disk", "image__datastore", "target_disk",
                                       "datastore", "schedule").get(pk=job.pk))
