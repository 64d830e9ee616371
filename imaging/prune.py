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
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Optional

from .errors import Cancelled, ImagingError, StoreError, translated
from .image import parse_stamp
from .progress import Progress
from .store import Datastore, check_disk_id, fsync_dir

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
        negative = [name for name, count in counts.items() if count < 0]
        if negative:
            raise ImagingError(f"--keep-{negative[0]} must not be negative")
        if not any(counts.values()):
            raise ImagingError("name what to keep (--keep-last, --keep-daily, ...): "
                               "without a rule prune would remove every image")


@dataclasses.dataclass
class PruneDecision:
    image: Path
    keep: bool
    reason: str  # the rule that keeps it and the period's rank, like "daily 3"


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


def remove_image(path: Path) -> None:
    """Hide the image under a name no reader takes for an image, then delete it."""
    hidden = path.with_name(f".{path.name}{DELETING_SUFFIX}")
    with translated(StoreError, f"cannot remove image {path}"):
        # Fresh, so garbage collection leaves it to us rather than deleting it alongside.
        os.utime(path)
        os.rename(path, hidden)
        fsync_dir(path.parent)
        shutil.rmtree(hidden)


def prune(store_dir: os.PathLike | str, disk_id: str, retention: Retention, *,
          dry_run: bool = False, progress: Optional[Progress] = None,
          tz: Optional[dt.tzinfo] = None) -> list[PruneDecision]:
    """Keep what `retention` says among the disk's images and remove the rest, newest first."""
    retention.check()
    store = Datastore.open(store_dir)
    disk_id = check_disk_id(disk_id)
    moments, unrecognised = {}, []
    for path in store.image_dirs(disk_id):
        try:
            moments[path.name] = parse_stamp(path.name)
        except ValueError:
            unrecognised.append(path)
    kept = select(moments, retention, tz)
    folder = store.images_dir / disk_id
    decisions = [PruneDecision(folder / name, name in kept, kept.get(name, ""))
                 for name in sorted(moments, key=moments.get, reverse=True)]
    # Never delete what is not named like an image.
    decisions += [PruneDecision(path, True, "not named like an image") for path in unrecognised]
    doomed = [d for d in decisions if not d.keep]
    progress = progress or Progress("prune", len(doomed))
    progress.start_phase("prune", len(doomed))
    if not dry_run:
        for decision in doomed:
            if progress.cancelled():
                raise Cancelled()
            remove_image(decision.image)
            progress.advance(1)
    progress.finish()
    return decisions
