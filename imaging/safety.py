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

No argument switches a check off. The mount table is read from MOUNTINFO, a
module constant that only tests point elsewhere, so that the root-disk
refusals can be tested without going near this machine's own disks.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional

from .device import block_size_of
from .errors import TargetError, describe
from .store import CONFIG_NAME

MOUNTINFO = "/proc/self/mountinfo"
SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_BLOCK = Path("/sys/block")


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor"
    mount_point: str
    source: str


@dataclass(frozen=True)
class Target:
    path: str
    is_block: bool
    size: int  # current size in bytes; 0 for a file that does not exist yet


@dataclass(frozen=True)
class _Loop:
    device: str  # "major:minor" of the loop device
    backing: str  # real path of its backing file or device node
    backing_device: Optional[str]  # "major:minor" when it is backed by a block device
    start: int
    end: int


def read_mounts(path: Optional[str] = None) -> list[Mount]:
    """Mounts from a /proc/<pid>/mountinfo-format table (this process's by default)."""
    path = path or MOUNTINFO
    mounts = []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TargetError(f"cannot read the mount table {path}: {describe(exc)}") from None
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if not sep or len(fields) < 5:
            continue
        source = after.split()[1] if len(after.split()) > 1 else ""
        mounts.append(Mount(fields[2], _unescape(fields[4]), source))
    return mounts


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _number(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _block_device_of(path: str) -> Optional[str]:
    """"major:minor" if `path` is a block device node, else None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return _number(info.st_rdev) if stat.S_ISBLK(info.st_mode) else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _loops() -> list[_Loop]:
    """Every attached loop device and the span of the file or device it serves."""
    loops = []
    for node in SYS_BLOCK.glob("loop*"):
        backing = _read(node / "loop" / "backing_file")
        device = _read(node / "dev")
        if not backing or not device:
            continue
        real = os.path.realpath(backing.removesuffix(" (deleted)"))
        start = int(_read(node / "loop" / "offset") or 0)
        limit = int(_read(node / "loop" / "sizelimit") or 0)
        end = start + (limit or int(_read(node / "size") or 0) * 512)
        loops.append(_Loop(device, real, _block_device_of(real), start, end))
    return loops


def _partitions_and_holders(device: str) -> list[str]:
    """The devices directly on top of `device`: its partitions and its holders (dm, md, ...)."""
    node = SYS_DEV_BLOCK / device
    found = []
    if node.is_dir():
        for child in node.iterdir():
            if (child / "partition").exists() and (number := _read(child / "dev")):
                found.append(number)
        holders = node / "holders"
        for holder in holders.iterdir() if holders.is_dir() else ():
            if number := _read(holder / "dev"):
                found.append(number)
    return found


def _users(path: str, device: Optional[str]) -> set[str]:
    """Every device whose data lies on the target, however deep.

    The target itself, then recursively whatever sits on a device already
    found: partitions, holders (LVM, LUKS and md stack up this way), loop
    devices backed by it, and loop devices over an overlapping span of the
    file a loop device found serves. A regular file starts with the loop
    devices over it.
    """
    loops = _loops()
    by_device = {loop.device: loop for loop in loops}
    real = os.path.realpath(path)
    pending = [device] if device else [loop.device for loop in loops if loop.backing == real]
    found: set[str] = set()
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.add(current)
        pending += _partitions_and_holders(current)
        pending += [loop.device for loop in loops if loop.backing_device == current]
        span = by_device.get(current)
        if span is not None:
            pending += [loop.device for loop in loops if loop.backing == span.backing
                        and loop.start < span.end and span.start < loop.end]
    return found


def _datastore_holding(path: str) -> Optional[Path]:
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _allowed(path: str, info: Optional[os.stat_result], allowed: Collection[str]) -> bool:
    """Is the target one of `allowed`: the same real path, or the same block device?"""
    real = os.path.realpath(path)
    device = _number(info.st_rdev) if info is not None and stat.S_ISBLK(info.st_mode) else None
    return any(os.path.realpath(candidate) == real
               or (device is not None and _block_device_of(candidate) == device)
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

    device = _number(info.st_rdev) if is_block else None
    mounts = read_mounts()
    users = _users(path, device)
    root = next((m for m in mounts if m.mount_point == "/"), None)
    if root is not None:
        # A btrfs root shows an anonymous device number: its source names the disk's.
        source = _block_device_of(root.source) if root.source.startswith("/dev/") else None
        root_devices = {root.device, source} - {None}
        if root_devices & users:
            raise TargetError(f"target {path} holds the running system's root filesystem")
    for mount in mounts:
        if mount.device in users:
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
