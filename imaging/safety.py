"""Restore safety: decide, before anything is opened for writing, whether a target may be overwritten.

Refused, each with its reason: a target outside the set of allowed targets
when the caller gives one; anything inside a datastore (a chunk, an image
file, whatever lies under a directory holding datastore.json); anything but a
block device or a regular file; a block device smaller than the image, and
an existing non-empty regular file smaller than it (a disk-image file is a
disk; a new or empty file is fine); a target that is mounted, or that lies
under a mounted filesystem through a partition, a holder (LVM, LUKS, md) or a
loop device over any part of it; and the disk holding the running system's
root filesystem, however many layers of holders lie between.

No argument switches a check off. What is mounted and what sits on a device come
from disks.mounts.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional

from .base.errors import TargetError, describe
from .datastore.store import CONFIG_NAME
from .disks.device import block_size_of
from .disks.mounts import block_device_of, device_number, read_mounts, users

@dataclass(frozen=True)
class Target:
    path: str
    is_block: bool
    size: int  # current size in bytes; 0 for a file that does not exist yet


def _datastore_holding(path: str) -> Optional[Path]:
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _allowed(path: str, info: Optional[os.stat_result], allowed: Collection[str]) -> bool:
    """Is the target one of `allowed`: the same real path, or the same block device?"""
    real = os.path.realpath(path)
    is_block = info is not None and stat.S_ISBLK(info.st_mode)
    device = device_number(info.st_rdev) if is_block else None
    return any(os.path.realpath(candidate) == real
               or (device is not None and block_device_of(candidate) == device)
               for candidate in allowed)


def check_target(path: str, image_size: int,
                 allowed_targets: Optional[Collection[str]] = None) -> Target:
    """Return the target if it may be overwritten by an image of `image_size` bytes.

    `allowed_targets`: when given, the only disks and files that may be
    written (a web request names one of this host's inventoried disks).
    """
    try:
        info: Optional[os.stat_result] = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise TargetError(f"target {path}: {describe(exc)}") from None
    if allowed_targets is not None and not _allowed(path, info, allowed_targets):
        raise TargetError(f"target {path} is not one of the allowed targets")
    datastore = _datastore_holding(path)
    if datastore is not None:
        raise TargetError(f"target {path} is inside the datastore {datastore}")
    if info is None:
        if not Path(path).parent.is_dir():
            raise TargetError(f"target {path}: no such file or directory")
        return Target(path, False, 0)

    is_block = stat.S_ISBLK(info.st_mode)
    if not is_block and not stat.S_ISREG(info.st_mode):
        raise TargetError(f"target {path}: not a block device or a regular file")
    size = _block_size(path) if is_block else info.st_size
    # An empty file is a new target; one with data is a disk, as a disk-image file.
    if size < image_size and (is_block or size > 0):
        kind = "" if is_block else "disk-image file "
        raise TargetError(f"target {kind}{path} is too small: {size} bytes, "
                          f"the image needs {image_size}")

    device = device_number(info.st_rdev) if is_block else None
    mounts = read_mounts()
    on_target = users(path, device)
    root = next((m for m in mounts if m.mount_point == "/"), None)
    if root is not None:
        # A btrfs root shows an anonymous device number: its source names the disk's.
        source = block_device_of(root.source) if root.source.startswith("/dev/") else None
        root_devices = {root.device, source} - {None}
        if root_devices & on_target:
            raise TargetError(f"target {path} holds the running system's root filesystem")
    for mount in mounts:
        if mount.device in on_target:
            if mount.device == device:
                raise TargetError(f"target {path} is mounted at {mount.mount_point}")
            raise TargetError(f"target {path} has a mounted partition "
                              f"({mount.source or mount.device} at {mount.mount_point})")
    return Target(path, is_block, size)


def _block_size(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot open target {path}: {describe(exc)}") from None
    try:
        return block_size_of(fd)[0]
    finally:
        os.close(fd)
