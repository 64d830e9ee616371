"""Copies: the datastores that sync jobs fill (a folder, or an rclone: remote), and where
each disk's newest image has a copy (the 3-2-1 rule: on site, off site)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Optional

from django.db import IntegrityError, transaction

from imaging.base import rclone
from imaging.base.errors import ImagingError

from ..models import Datastore, Job, Schedule
from .errors import Refused

# rclone's --bwlimit without its timetable: a rate, or upload:download rates (8M, 1M:off).
RATE = r"(?:off|[0-9]{1,9}(?:\.[0-9]{1,3})?[BKMGTP]?)"
BWLIMIT_RE = re.compile(rf"^{RATE}(?::{RATE})?$", re.IGNORECASE)
LABEL_RE = re.compile(r"^[\w][\w .+-]{0,62}$")
MAX_REMOTE = 1024
# The backends a connection string may name: where copies go. Not local, alias, union or
# combine (a folder of the worker's host), nor wrappers of another remote.
STORAGE_BACKENDS = {"azureblob", "b2", "box", "drive", "dropbox", "ftp", "gcs",
                    "googlecloudstorage", "hdfs", "koofr", "mega", "onedrive", "opendrive",
                    "pcloud", "s3", "seafile", "sftp", "smb", "storj", "swift", "webdav", "zoho"}
# Options that run a command on the worker's host, whatever the backend: with a value, or
# alone (rclone reads an option alone as =true).
COMMAND_OPTION = re.compile(r",[\w-]*(?:command|ssh)[\w-]*[=,:]", re.IGNORECASE)


def add_remote(path: str, *, label: str = "", offsite: bool = True,
               bwlimit: str = "") -> Datastore:
    """Record an rclone: remote as a datastore that sync jobs can copy to."""
    path, label, bwlimit = path.strip(), label.strip(), bwlimit.strip()
    if not rclone.is_remote(path):
        raise Refused("a remote starts with rclone: and what rclone takes as a remote path "
                      "(rclone:NAME:PATH, or rclone::webdav,url='...':PATH)")
    try:
        remote = rclone.remote_of(path)
    except ImagingError as exc:
        raise Refused(str(exc)) from None
    if len(path) > MAX_REMOTE:
        raise Refused(f"the remote is longer than {MAX_REMOTE} characters")
    _check_connection_string(remote)
    if label and not LABEL_RE.match(label):
        raise Refused(f"name {label!r}: up to 63 letters, digits, spaces and ._+-")
    if bwlimit and not BWLIMIT_RE.match(bwlimit):
        raise Refused(f"bandwidth limit {bwlimit!r}: a rate like 8M, or 8M:off for upload "
                      "and download")
    try:
        with transaction.atomic():
            return Datastore.objects.create(path=path, label=label, offsite=offsite,
                                            bwlimit=bwlimit)
    except IntegrityError:
        raise Refused(f"{rclone.shown(path)} is a datastore already") from None


def _check_connection_string(remote: str) -> None:
    """A connection string (`:backend,option=value:path`) names a storage backend, and no
    remote's options run anything, a configured remote's overrides (`name,option=value:path`)
    included: the worker runs rclone as root. A configured remote itself (`name:path`) is
    the host's own rclone.conf, which root wrote."""
    if remote.startswith(":"):
        backend = re.split(r"[,:]", remote[1:], maxsplit=1)[0].lower()
        if backend not in STORAGE_BACKENDS:
            raise Refused(f"backend {backend!r}: a copy goes to a storage backend "
                          f"({', '.join(sorted(STORAGE_BACKENDS))})")
    if COMMAND_OPTION.search(remote):
        raise Refused("a remote's options may not run a command on the worker's host "
                      "(options named like command or ssh)")


@dataclasses.dataclass
class Copy:
    """A datastore that another one is copied to, and how that copying stands."""

    destination: Datastore
    last_sync: Optional[dt.datetime]  # when the last copy that succeeded began
    last_state: str  # of the last copy job ("" if none ran)
    schedules: int  # enabled sync schedules from the source to it


def copies_of(source: Datastore) -> list[Copy]:
    """Where `source` is copied to: its sync schedules' destinations and those of its
    sync jobs, each with when it was last in sync."""
    jobs = Job.objects.filter(kind="sync", datastore=source, destination__isnull=False)
    scheduled = Schedule.objects.filter(kind=Schedule.Kind.SYNC, datastore=source, enabled=True)
    destinations = Datastore.objects.filter(pk__in=set(
        jobs.values_list("destination", flat=True)) | set(
        scheduled.values_list("destination", flat=True)))
    copies = []
    for destination in destinations:
        to = jobs.filter(destination=destination)
        last = to.order_by("-created").first()
        synced = (to.filter(state__in=(Job.State.SUCCEEDED, Job.State.SUCCEEDED_WITH_WARNINGS))
                  .order_by("-started").values_list("started", flat=True).first())
        copies.append(Copy(destination, synced, last.state if last else "",
                           scheduled.filter(destination=destination).count()))
    return copies

