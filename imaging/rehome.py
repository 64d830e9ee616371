"""Rehome: images filed under a disk id that names no host move to their host's disk.

Older engines named a disk with no identity unique across machines without its
host (`dev-vda`, `QEMU_HARDDISK_QM00001`), so every VM's /dev/vda shared one
folder. Each image's manifest records the host that took it: the image moves to
images/<the id that host's engine now gives the disk>/ (inventory.rehomed_id),
and its manifest and RESTORE.txt name that id and place.

Crash-safe and idempotent: the manifest and RESTORE.txt are replaced in place
first, each atomically (the folder, not the manifest, files an image), then the
image's folder is renamed into the new disk's folder, one atomic rename. A run
cut short leaves each image whole in one of the two folders, and the next run
moves what is left. Garbage collection waits meanwhile (Datastore.rehoming), so
it never lists an image between two folders. An image a running job reads
stays where its reader found it, as prune leaves it (see prune.remove_image),
and a later run moves it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Optional

from .base.errors import ImageError, StoreError, translated
from .datastore import recipe
from .datastore.image import read_manifest, reseal, write_image_files
from .datastore.manifest import Manifest
from .base.syscalls import fsync_dir
from .datastore.store import Datastore, Job, write_atomically
from .disks.inventory import host_less, rehomed_id
from .prune import reader_of



@dataclasses.dataclass
class RehomeResult:
    moved: list[tuple[str, str]]  # (old, new) image folder
    deferred: list[str]  # "folder: why", moved by a later run
    left: list[str]  # "folder: why", staying where it is

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def rehome(store_dir: os.PathLike | str) -> RehomeResult:
    """Move every image whose disk id names no host to its host's disk id."""
    store = Datastore.open(store_dir)
    result = RehomeResult([], [], [])
    with store.rehoming():
        for disk_id in store.disk_ids():
            moved = len(result.moved)
            for path in store.image_dirs(disk_id):
                _rehome_image(store, path, result)
            if len(result.moved) > moved:
                with contextlib.suppress(OSError):  # not empty: an image stays, or a writer is busy
                    (store.images_dir / disk_id).rmdir()
    return result


def _rehome_image(store: Datastore, path: Path, result: RehomeResult) -> None:
    old_id = path.parent.name
    try:
        manifest = read_manifest(store, path)
    except ImageError as exc:
        if host_less(old_id):
            result.left.append(f"{path}: {exc}")
        return
    if not host_less(old_id, manifest.disk.get("model")):
        return
    if manifest.disk.get("source") == "import":
        result.left.append(f"{path}: its id was given to the import that made it")
        return
    new_id = rehomed_id(old_id, manifest.disk)
    if new_id is None:
        result.left.append(f"{path}: its manifest names no host")
        return
    target = store.images_dir / new_id / path.name
    if target.exists():
        result.left.append(f"{path}: {target} is another image")
        return
    reader = reader_of(store, path)
    if reader is None:
        with translated(StoreError, f"cannot move image {path} to {target}"):
            try:
                reader = _move(store, path, manifest, target)
            except FileNotFoundError:
                return  # pruned meanwhile
    if reader is not None:
        result.deferred.append(f"{path}: being read by {reader.what} on {reader.host}")
    else:
        result.moved.append((str(path), str(target)))


def _move(store: Datastore, path: Path, manifest: Manifest, target: Path) -> Optional[Job]:
    """Move the image; the job found reading it, which then keeps it where it was."""
    new_id = target.parent.name
    renamed = dataclasses.replace(manifest, disk={**manifest.disk, "id": new_id})
    reseal(store, path, target)
    write_image_files(store, path, renamed, write_atomically, placed=target)
    write_atomically(path / recipe.NAME,
                     recipe.render(renamed, target, store.fingerprint).encode())
    fsync_dir(path)
    target.parent.mkdir(exist_ok=True)
    os.rename(path, target)
    fsync_dir(path.parent)
    fsync_dir(target.parent)
    # A reader not seen before the rename registered since: it finds the image gone,
    # unless it opened it first; either way the image goes back where it looks.
    reader = reader_of(store, path)
    if reader is not None:
        os.rename(target, path)
        fsync_dir(path.parent)
        fsync_dir(target.parent)
    return reader
