"""Garbage collection: delete the chunks no image references, as Proxmox Backup Server does.

Mark: the digests listed by the index of every complete image. Sweep: a chunk
not marked is deleted only if its mtime is older than the cutoff, which is the
earlier of this collection's start and the start of the oldest backup still
running, minus a safety margin. A running backup touches (os.utime) every
existing chunk it reuses before counting on it and writes new chunks with fresh
mtimes, so everything it may reference is newer than the cutoff; the writers
list is read before the images are listed, so a backup that publishes its
image meanwhile was either seen running or is seen in the images.

One race remains in that scheme: a backup may touch a chunk between the sweep's
look at its mtime and the unlink. The sweep closes it without any lock on the
backup side: it first renames the chunk aside (atomically), then looks at the
mtime again. A touch that landed before the rename shows in that mtime, and the
chunk is renamed back; a touch after the rename finds no file, so the backup
stores the chunk afresh. Either way nothing a backup counts on is lost.

Also removed: quarantined `*.bad` chunks; temporary files (`.*.tmp`) in chunk
folders and hidden `.<stamp>.tmp` image folders left by writers that died
(older than the cutoff and a grace period); `.<stamp>.deleting` folders of an
interrupted prune; chunks set aside by an interrupted collection go back first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import Cancelled, ImageError, StoreError, translated
from .image import Image
from .progress import Progress
from .prune import DELETING_SUFFIX
from .store import BAD_SUFFIX, CHUNK_SUFFIX, DIGEST_RE, Datastore

# Clock skew between hosts sharing the store, and coarse file timestamps.
DEFAULT_SAFETY_MARGIN = 60.0
# A temporary file this old belongs to nobody, whatever the writers list says.
DEFAULT_TEMP_GRACE = 3600.0
ASIDE_SUFFIX = ".sweeping"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".gc.lock"


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


@contextlib.contextmanager
def _exclusive(store: Datastore) -> Iterator[None]:
    with translated(StoreError, "cannot lock the datastore for garbage collection"):
        handle = open(store.root / LOCK_NAME, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another garbage collection is running on {store.root}") from None
        yield
    finally:
        handle.close()


def cutoff_time(store: Datastore, now: float, safety_margin: float) -> float:
    """Chunks last touched before this cannot be needed by any running backup."""
    starts = [now] + [writer["started"] for writer in store.running_writers()]
    return min(starts) - safety_margin


def referenced_chunks(store: Datastore) -> tuple[int, set[str]]:
    """(number of images, digests referenced by every complete image)."""
    images, digests = 0, set()
    for path in store.image_dirs():
        try:
            digests.update(Image.open(path).index())
        except ImageError as exc:
            if not path.exists():
                continue  # pruned meanwhile: its chunks are garbage anyway
            raise StoreError(f"garbage collection stopped, nothing deleted: {exc}") from None
        images += 1
    return images, digests


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
    started = time.monotonic()
    store = Datastore.open(store_dir)
    with _exclusive(store):
        now = time.time()
        cutoff = cutoff_time(store, now, safety_margin)
        stale = min(cutoff, now - temp_grace)
        images, referenced = referenced_chunks(store)
        result = GcResult(images, len(referenced), 0, 0, 0, 0, 0, 0.0)
        folders = store.chunk_dirs()
        progress = progress or Progress("gc", len(folders))
        progress.start_phase("gc", len(folders))
        with translated(StoreError, "garbage collection failed"):
            for folder in folders:
                if progress.cancelled():
                    raise Cancelled()
                _sweep_folder(folder, referenced, cutoff, stale, result)
                progress.advance(1)
            _sweep_image_folders(store, stale, result)
    progress.finish()
    result.seconds = round(time.monotonic() - started, 3)
    return result


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
