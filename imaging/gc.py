"""Garbage collection: delete the chunks no image references, as Proxmox Backup Server does.

Mark: the digests listed by the index of every complete image. Sweep: a chunk
not marked is deleted only if its mtime is older than the cutoff, which is the
earlier of this collection's start and the start of the oldest job still
writing (a backup or an import), minus a safety margin. A running backup
touches (os.utime) every existing chunk it reuses before counting on it and
writes new chunks with fresh mtimes, so everything it may reference is newer
than the cutoff; the jobs are read before the images are listed, so a backup
that publishes its image meanwhile was either seen running or is seen in the
images.

Jobs that read images (restore, export, verify, recompress, mount) need the
chunks of the images they read. Prune defers an image being read, so those
are marked like any other; the jobs are read again after the images are
listed, and a live reader of an image not among them (deleted by hand, or by
a prune on a host whose NFS cache hid the reader from it) keeps every
unreferenced chunk, since only that reader knows what it still needs. A prune
hides an image while it looks for readers and may put it back: collection
waits for running prunes and keeps them out (Datastore.collecting).

One race remains in that scheme: a backup may touch a chunk between the sweep's
look at its mtime and the unlink. The sweep closes it without any lock on the
backup side: it first renames the chunk aside (atomically), then looks at the
mtime again. A touch that landed before the rename shows in that mtime, and the
chunk is renamed back; a touch after the rename finds no file, so the backup
stores the chunk afresh. Either way nothing a backup counts on is lost.

Also removed: quarantined `*.bad` chunks; temporary files (`.*.tmp`) in chunk
folders and hidden `.<stamp>.tmp` image folders left by writers that died
(older than the cutoff and a grace period); `.<stamp>.deleting` folders of an
interrupted prune; the tokens of jobs whose heartbeat went stale; chunks set
aside by an interrupted collection go back first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .base import rclone
from .base.errors import Cancelled, ImageError, ImagingError, StoreError, translated
from .base.progress import UNIT_CHUNKS, Progress
from .datastore.chunks import bases_named_by_files
from .datastore.codec import DIGEST_RE
from .datastore.image import references
from .datastore.manifest import NAME as MANIFEST_NAME
from .datastore.remote import RemoteStore
from .datastore.store import (BAD_SUFFIX, CHUNK_SUFFIX, COLLECTING, TEMP_SUFFIX,
                              UNDATED_WRITING_KINDS, Datastore, Job)
from .prune import DELETING_SUFFIX

# Clock skew between hosts sharing the store, and coarse file timestamps.
DEFAULT_SAFETY_MARGIN = 60.0
# A temporary file this old belongs to nobody, whatever the jobs say.
DEFAULT_TEMP_GRACE = 3600.0
ASIDE_SUFFIX = ".sweeping"


@dataclasses.dataclass
class GcResult:
    images: int  # complete images whose chunks were marked
    referenced: int  # distinct chunks they reference
    removed: int  # unreferenced chunks deleted
    freed_bytes: int  # their size, plus .bad chunks and temporary files
    kept_recent: int  # unreferenced chunks kept because a backup may still need them
    bad_removed: int
    temp_removed: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def cutoff_time(jobs: list[Job], images: set[str], now: float, safety_margin: float) -> float:
    """Chunks last touched before this are needed by no running job but through `images`."""
    if reads_a_gone_image(jobs, images) or any(job.kind in UNDATED_WRITING_KINDS
                                                for job in jobs):
        return float("-inf")
    return min([now] + [job.started for job in jobs
                        if job.writes and job.kind != COLLECTING]) - safety_margin


def reads_a_gone_image(jobs: list[Job], images: set[str]) -> bool:
    """Whether a job reads an image not among `images` (deleted by hand, or by a prune on a
    host whose cache hid the reader): only it knows which chunks it still needs."""
    return any(image not in images for job in jobs for image in job.images)


def referenced_chunks(store: Datastore,
                      image_dirs: Optional[list[Path]] = None) -> tuple[set[str], set[str]]:
    """("<disk-id>/<stamp>" of every complete image (of `image_dirs`, default all), the
    digests they reference)."""
    images, digests = set(), set()
    for path in store.image_dirs() if image_dirs is None else image_dirs:
        try:
            digests |= references(store, path)
        except ImageError as exc:
            if not path.exists():
                continue  # deleted meanwhile: its chunks are garbage anyway
            raise StoreError(f"garbage collection stopped, nothing deleted: {exc}") from None
        images.add(f"{path.parent.name}/{path.name}")
    if store.encrypted:
        return images, digests  # references name the bases too, read without the key
    return images, digests | bases_named_by_files(store, digests)



def sweep_chunk(path: Path, cutoff: float) -> int:
    """Delete an unreferenced chunk unless touched since `cutoff`; the bytes freed."""
    aside = path.with_name(f".{path.name}{ASIDE_SUFFIX}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return 0
    info = os.stat(aside)
    if info.st_mtime >= cutoff:
        os.rename(aside, path)  # a backup touched it after all: it counts on it
        return 0
    os.unlink(aside)
    return info.st_size


def _put_back(aside: Path) -> None:
    """A chunk an interrupted collection set aside goes back (over any copy stored since:
    same name, same content)."""
    os.rename(aside, aside.with_name(aside.name[1:-len(ASIDE_SUFFIX)]))


def collect(store_dir: os.PathLike | str, *, safety_margin: float = DEFAULT_SAFETY_MARGIN,
            temp_grace: float = DEFAULT_TEMP_GRACE,
            progress: Optional[Progress] = None) -> GcResult:
    """`safety_margin`: seconds of clock skew between hosts and file timestamp coarseness
    to allow for; chunks touched that long before the oldest running writer began stay too.
    `store_dir` is a datastore's folder or `rclone:` and a remote datastore."""
    if safety_margin < 0:
        raise ImagingError(f"the safety margin must not be negative ({safety_margin:g} s): it "
                           "would delete chunks a running backup has just counted on")
    started = time.monotonic()
    progress = progress or Progress("gc", 0, unit=UNIT_CHUNKS)
    if rclone.is_remote(store_dir):
        result = collect_remote(RemoteStore(rclone.remote_of(str(store_dir)),
                                            cancelled=progress.cancelled), progress)
        result.seconds = round(time.monotonic() - started, 3)
        return result
    store = Datastore.open(store_dir)
    # Registered, so that a sync into this folder through a remote waits (remote.py).
    with store.collecting(), \
            store.register(COLLECTING, "garbage collection", progress=progress), \
            translated(StoreError, "garbage collection failed"):
        now = store.clock()
        jobs = store.running_jobs()
        images, referenced = referenced_chunks(store)
        jobs += store.running_jobs()  # and the readers that started meanwhile
        cutoff = cutoff_time(jobs, images, now, safety_margin)
        stale = min(cutoff, now - temp_grace)
        result = GcResult(len(images), len(referenced), 0, 0, 0, 0, 0, 0.0)
        folders = [(folder, _chunk_count(folder)) for folder in store.chunk_dirs()]
        progress.start_phase("gc", sum(count for _, count in folders), unit=UNIT_CHUNKS)
        for folder, count in folders:
            if progress.cancelled():
                raise Cancelled()
            _sweep_folder(folder, referenced, cutoff, stale, result)
            progress.advance(count)
        _sweep_image_folders(store, stale, result)
        result.temp_removed += store.forget_dead_jobs()
    progress.finish()
    result.seconds = round(time.monotonic() - started, 3)
    return result


def collect_remote(store: RemoteStore, progress: Progress) -> GcResult:
    """Garbage collection at a remote, alone there: it does not start while a sync, a prune
    or another collection runs there, nor they while it runs (remote.py says how), so no
    chunk is new and every unreferenced one goes. Also removed: the files of images whose
    manifest is missing (a sync or prune that died midway) and stale job tokens. The
    images' indexes are read through a read-only mount; deletions go in one rclone run."""
    store.check_datastore()
    with store.register(COLLECTING, "garbage collection", progress=progress,
                        excludes=lambda job: job.writes):
        files = store.listing(hidden=True)
        folders: dict[str, list[str]] = {}
        for path in files:
            # A hidden image folder is a local writer's (a backup's into the folder a
            # server serves as this remote): not this collection's.
            if path.startswith("images/") and path.count("/") == 3 and "/." not in \
                    path.rpartition("/")[0]:
                folders.setdefault(path.rpartition("/")[0], []).append(path)
        complete = sorted(folder for folder, paths in folders.items()
                          if f"{folder}/{MANIFEST_NAME}" in paths)
        with rclone.mounted(store.remote) as point:
            images, referenced = referenced_chunks(Datastore.open(point),
                                                   [point / folder for folder in complete])
        jobs = store.running_jobs()
        chunks = {path: digest for path in files if (digest := _chunk_digest(path))}
        unreferenced = [path for path, digest in chunks.items() if digest not in referenced]
        result = GcResult(len(images), len(referenced), 0, 0, 0, 0, 0, 0.0)
        if reads_a_gone_image(jobs, images):
            result.kept_recent, unreferenced = len(unreferenced), []
        halves = [path for folder, paths in folders.items() if folder not in complete
                  for path in paths]
        progress.start_phase("gc", len(chunks), unit=UNIT_CHUNKS)
        if unreferenced or halves:
            store.delete(unreferenced + halves)
            store.remove_empty_folders("images")
        result.removed = len(unreferenced)
        result.temp_removed = len({path.rpartition("/")[0] for path in halves})
        result.freed_bytes = sum(files[path] for path in unreferenced + halves)
        progress.advance(len(chunks))
        result.temp_removed += store.forget_dead_jobs()
    progress.finish()
    return result


def _chunk_digest(path: str) -> Optional[str]:
    """The digest a remote file (its path below the datastore) holds, if it is a chunk."""
    name = path.rpartition("/")[2]
    digest = name[:-len(CHUNK_SUFFIX)]
    return digest if path.startswith("chunks/") and name.endswith(CHUNK_SUFFIX) \
        and DIGEST_RE.match(digest) else None


def _chunk_count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(entry.name.endswith(CHUNK_SUFFIX) for entry in entries)


def _sweep_folder(folder: Path, referenced: set[str], cutoff: float, stale: float,
                  result: GcResult) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            _sweep_entry(entry, referenced, cutoff, stale, result)


def _sweep_entry(entry: os.DirEntry, referenced: set[str], cutoff: float, stale: float,
                 result: GcResult) -> None:
    name = entry.name
    digest = name[:-len(CHUNK_SUFFIX)]
    try:
        if name.startswith(".") and name.endswith(ASIDE_SUFFIX):
            _put_back(Path(entry.path))  # judged again by the next collection
        elif name.startswith(".") and name.endswith(TEMP_SUFFIX):
            info = entry.stat()
            if info.st_mtime < stale:
                os.unlink(entry)
                result.temp_removed += 1
                result.freed_bytes += info.st_size
        elif name.endswith(CHUNK_SUFFIX + BAD_SUFFIX):
            size = entry.stat().st_size
            os.unlink(entry)
            result.bad_removed += 1
            result.freed_bytes += size
        elif name.endswith(CHUNK_SUFFIX) and DIGEST_RE.match(digest) and digest not in referenced:
            freed = 0 if entry.stat().st_mtime >= cutoff else sweep_chunk(Path(entry.path), cutoff)
            if freed:
                result.removed += 1
                result.freed_bytes += freed
            else:
                result.kept_recent += 1
    except FileNotFoundError:
        pass  # gone meanwhile, e.g. a backup's batch renamed its temporary into place


def _sweep_image_folders(store: Datastore, stale: float, result: GcResult) -> None:
    if not store.images_dir.is_dir():
        return
    for disk in store.images_dir.iterdir():
        if not disk.is_dir():
            continue
        for entry in disk.iterdir():
            if not entry.name.startswith(".") or not entry.name.endswith((TEMP_SUFFIX,
                                                                          DELETING_SUFFIX)):
                continue
            # A live prune's folder is fresh: prune touches an image before hiding it.
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir() and entry.stat().st_mtime < stale:
                    shutil.rmtree(entry, ignore_errors=True)
                    result.temp_removed += 1
