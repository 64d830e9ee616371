"""Prune: which images of a disk to keep, with Proxmox Backup Server's rules.

Images are taken newest first. keep-last N keeps the N newest. Then each of
keep-hourly, -daily, -weekly, -monthly and -yearly N walks the images not yet
decided and keeps the newest image of each of the N most recent periods
(hour, day, ISO week, month, year in local time) that still have one; a period
that already holds an image kept by an earlier rule is skipped and does not
count, and the older images of a period it keeps are marked for removal and
not looked at by later rules. Whatever no rule keeps is removed.

Removing an image renames its directory to a hidden `.<stamp>.deleting`
first, so a crash midway never leaves a half-deleted image that looks
complete. Its chunks stay until garbage collection finds them unreferenced.

An image that a running job (a restore, an export, ...) is reading is not
removed: it is deferred, kept this time with the reason, and the next prune
decides again. Prune hides the image first, then looks for its readers, and
puts it back if it finds one; a reader registers first, then opens the image.
Whichever comes second sees the other, so no reader goes on with an image
being deleted. Garbage collection does not run meanwhile (Datastore.pruning),
so it never mistakes an image hidden for a moment for a removed one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Protocol

from .base import rclone
from .base.errors import Cancelled, ImagingError, StoreError, translated
from .base.progress import UNIT_IMAGES, Progress
from .base.syscalls import fsync_dir
from .datastore import remote
from .datastore.image import parse_stamp, protection
from .datastore.manifest import NAME as MANIFEST_NAME
from .datastore.remote import RemoteStore
from .datastore.store import PROTECTED_NAME, PRUNING, Datastore, Job, check_disk_id

DELETING_SUFFIX = ".deleting"
# Rule name and the strftime pattern that names its period (None: every image is its own).
RULES = (("last", None), ("hourly", "%Y/%m/%d/%H"), ("daily", "%Y/%m/%d"),
         ("weekly", "%G/%V"), ("monthly", "%Y/%m"), ("yearly", "%Y"))


@dataclasses.dataclass(frozen=True)
class Retention:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def check(self) -> None:
        counts = dataclasses.asdict(self)
        negative = [(name, count) for name, count in counts.items() if count < 0]
        if negative:
            name, count = negative[0]
            raise ImagingError(f"the {name} rule must not keep a negative number of images "
                               f"({count})")
        if not any(counts.values()):
            raise ImagingError("name what to keep (the last, hourly, daily, weekly, monthly or "
                               "yearly images): without a rule prune would remove every image")


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    image: Path
    keep: bool
    reason: str  # the rule that keeps it and the period's rank, like "daily 3", or who reads it

    def as_dict(self) -> dict:
        return {"image": str(self.image), "keep": self.keep, "reason": self.reason}


@dataclasses.dataclass
class PruneResult:
    decisions: list[PruneDecision]  # newest first, then whatever is not named like an image
    removed: list[Path]  # nothing on a dry run
    deferred: list[Path]  # no rule keeps them, but a running job is reading them

    def as_dict(self) -> dict:
        return {"decisions": [decision.as_dict() for decision in self.decisions],
                "removed": [str(path) for path in self.removed],
                "deferred": [str(path) for path in self.deferred]}


def select(moments: dict[str, dt.datetime], retention: Retention,
           tz: Optional[dt.tzinfo] = None) -> dict[str, str]:
    """The images to keep, by name, each with the rule that keeps it."""
    newest_first = sorted(moments, key=lambda name: moments[name], reverse=True)
    marks: dict[str, Optional[str]] = {}  # name -> reason it is kept, None if removed
    for rule, pattern in RULES:
        count = getattr(retention, rule)
        if not count:
            continue

        def period(name: str) -> str:
            return name if pattern is None else moments[name].astimezone(tz).strftime(pattern)

        already_kept = {period(name) for name, reason in marks.items() if reason}
        periods: list[str] = []
        for name in newest_first:
            if name in marks or period(name) in already_kept:
                continue
            if period(name) in periods:
                marks[name] = None
                continue
            if len(periods) == count:
                break
            periods.append(period(name))
            marks[name] = f"{rule} {len(periods)}"
    return {name: reason for name, reason in marks.items() if reason}


def reader_of(store: Datastore | RemoteStore, image: Path) -> Optional[Job]:
    """A running job that reads `image` (its folder, .../DISK/STAMP), if there is one."""
    name = f"{image.parent.name}/{image.name}"
    return next((job for job in store.running_jobs() if job.reads(name)), None)


def remove_image(store: Datastore, path: Path) -> Optional[Job]:
    """Delete an image, unless a running job reads it: then that job, and the image stays.

    Call it holding `store.pruning()`. A protected image is refused.
    """
    if protection(path) is not None:
        raise StoreError(f"{path} is protected: unprotect it first (imaging unprotect)")
    reader = reader_of(store, path)
    if reader is not None:
        return reader
    # Hidden under a name no reader takes for an image, and fresh, so garbage
    # collection leaves the folder to us rather than deleting it alongside.
    hidden = path.with_name(f".{path.name}{DELETING_SUFFIX}")
    with translated(StoreError, f"cannot remove image {path}"):
        os.utime(path)
        os.rename(path, hidden)
        fsync_dir(path.parent)
        # A reader not seen by now registered after the rename: it finds the image gone.
        reader = reader_of(store, path)
        if reader is not None:
            os.rename(hidden, path)
            fsync_dir(path.parent)
            return reader
        shutil.rmtree(hidden)
    return None


class Images(Protocol):
    """A disk's images where they lie, as prune sees them."""
    folder: Path

    def stamps(self) -> dict[str, bool]:
        """Each image's folder name, and whether it is protected."""

    def holding(self, progress: Progress) -> contextlib.AbstractContextManager:
        """While removing: no garbage collection."""

    def reader_of(self, image: Path) -> Optional[Job]: ...

    def remove(self, image: Path) -> Optional[Job]:
        """Remove it, unless a running job reads it: then that job."""


class LocalImages:
    def __init__(self, store: Datastore, disk_id: str) -> None:
        self.store, self.folder = store, store.images_dir / disk_id
        self.disk_id = disk_id

    def stamps(self) -> dict[str, bool]:
        return {path.name: protection(path) is not None
                for path in self.store.image_dirs(self.disk_id)}

    @contextlib.contextmanager
    def holding(self, progress: Progress) -> Iterator[None]:
        # Registered, so that a sync into this folder through a remote waits (remote.py).
        with self.store.pruning(), self.store.register(PRUNING, f"prune of {self.disk_id}",
                                                       progress=progress):
            yield

    def reader_of(self, image: Path) -> Optional[Job]:
        return reader_of(self.store, image)

    def remove(self, image: Path) -> Optional[Job]:
        return remove_image(self.store, image)


class RemoteImages:
    """A disk's images at an rclone remote: an image is there while its manifest is. One
    is removed as a local one is: its manifest hidden first (moved aside), its readers
    looked for, then its folder deleted, or the manifest put back for a reader."""

    def __init__(self, store: RemoteStore, disk_id: str) -> None:
        store.check_datastore()
        self.store, self.disk_id = store, disk_id
        self.folder = Path("images", disk_id)

    def stamps(self) -> dict[str, bool]:
        files: dict[str, set[str]] = {}
        for path in self.store.listing(str(self.folder)):
            stamp, _, name = path[len(str(self.folder)) + 1:].partition("/")
            files.setdefault(stamp, set()).add(name)
        return {stamp: PROTECTED_NAME in names for stamp, names in files.items()
                if MANIFEST_NAME in names}

    def holding(self, progress: Progress) -> contextlib.AbstractContextManager:
        return self.store.register(PRUNING, f"prune of {self.disk_id}",
                                   progress=progress, excludes=remote.deletes_or_uploads)

    def reader_of(self, image: Path) -> Optional[Job]:
        return reader_of(self.store, image)

    def remove(self, image: Path) -> Optional[Job]:
        if PROTECTED_NAME in {path.rpartition("/")[2] for path in self.store.listing(str(image))}:
            raise StoreError(f"{self.store.name}/{image} is protected: unprotect it first "
                             "(imaging unprotect)")
        reader = self.reader_of(image)
        if reader is not None:
            return reader
        manifest, hidden = f"{image}/{MANIFEST_NAME}", f"{image}/.{MANIFEST_NAME}{DELETING_SUFFIX}"
        self.store.move(manifest, hidden)
        reader = self.reader_of(image)
        if reader is not None:
            self.store.move(hidden, manifest)
            return reader
        self.store.purge(str(image))
        return None


def prune(store_dir: os.PathLike | str, disk_id: str, retention: Retention, *,
          dry_run: bool = False, progress: Optional[Progress] = None,
          tz: Optional[dt.tzinfo] = None) -> PruneResult:
    """Keep what `retention` says among the disk's images and remove the rest, newest first.
    `store_dir` is a datastore's folder or `rclone:` and a remote datastore.

    A dry run removes nothing; it still defers the images being read now.
    """
    retention.check()
    disk_id = check_disk_id(disk_id)
    progress = progress or Progress("prune", 0, unit=UNIT_IMAGES)
    images: Images = RemoteImages(RemoteStore(rclone.remote_of(str(store_dir)),
                                              cancelled=progress.cancelled), disk_id) \
        if rclone.is_remote(store_dir) else LocalImages(Datastore.open(store_dir), disk_id)
    moments, unrecognised, protected = {}, [], set()
    for name, is_protected in images.stamps().items():
        try:
            moments[name] = parse_stamp(name)
        except ValueError:
            unrecognised.append(images.folder / name)
            continue
        if is_protected:
            protected.add(name)  # kept besides what the rules keep, and never counted by them
    kept = select({name: moment for name, moment in moments.items() if name not in protected},
                  retention, tz)
    kept.update((name, "protected") for name in protected)
    decisions = [PruneDecision(images.folder / name, name in kept, kept.get(name, ""))
                 for name in sorted(moments, key=moments.get, reverse=True)]
    # Never delete what is not named like an image.
    decisions += [PruneDecision(path, True, "not named like an image")
                  for path in sorted(unrecognised)]
    doomed = sum(not decision.keep for decision in decisions)
    progress.start_phase("prune", doomed, unit=UNIT_IMAGES)
    removed, deferred = [], []
    with contextlib.nullcontext() if dry_run else images.holding(progress):
        for position, decision in enumerate(decisions):
            if decision.keep:
                continue
            if progress.cancelled():
                raise Cancelled()
            image = decision.image
            reader = images.reader_of(image) if dry_run else images.remove(image)
            if reader is not None:
                decisions[position] = PruneDecision(
                    image, True, f"being read by {reader.what} on {reader.host}")
                deferred.append(image)
            elif not dry_run:
                removed.append(image)
            progress.advance(1)
    progress.finish()
    return PruneResult(decisions, removed, deferred)
