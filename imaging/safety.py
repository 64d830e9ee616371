"""Restore safety: decide, before anything is opened for writing, whether a target may be overwritten.

Refused: a block device smaller than the image, one that is mounted, one with a
mounted partition (or a mounted loop device over any part of it), and the disk
holding the running system's root filesystem. The mount table is read from a
path the caller may replace, so the refusals can be tested without going near
this machine's own disks.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .device import block_size_of
from .errors import TargetError, describe

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


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Mounts from a /proc/<pid>/mountinfo-format table."""
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


def _dev_of(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _disk_of(device: str) -> str:
    """The whole disk a partition belongs to ("major:minor"), or the device itself."""
    node = SYS_DEV_BLOCK / device
    if (node / "partition").exists():
        parent = _read(node.resolve().parent / "dev")
        if parent:
            return parent
    return device


def _loop_span(name: str) -> Optional[tuple[str, int, int]]:
    """(backing file, offset, end) of an attached loop device."""
    loop = SYS_BLOCK / name / "loop"
    backing = _read(loop / "backing_file")
    if not backing:
        return None
    offset = int(_read(loop / "offset") or 0)
    limit = int(_read(loop / "sizelimit") or 0)
    sectors = int(_read(SYS_BLOCK / name / "size") or 0)
    end = offset + (limit or sectors * 512)
    return os.path.realpath(backing.removesuffix(" (deleted)")), offset, end


def _users(target: str, target_dev: Optional[str]) -> set[str]:
    """Every device whose data lies on the target: itself, partitions, holders, loops over it."""
    found: set[str] = set()
    span: Optional[tuple[str, int, int]] = None
    if target_dev:
        found.add(target_dev)
        node = SYS_DEV_BLOCK / target_dev
        for child in node.iterdir() if node.is_dir() else ():
            if (child / "partition").exists() and (dev := _read(child / "dev")):
                found.add(dev)
        for holder in (node / "holders").iterdir() if (node / "holders").is_dir() else ():
            if dev := _read(holder / "dev"):
                found.add(dev)
        if node.is_dir():
            span = _loop_span(node.resolve().name)
    real = os.path.realpath(target)
    for loop in SYS_BLOCK.glob("loop*"):
        other = _loop_span(loop.name)
        if other is None:
            continue
        backing, start, end = other
        over_target = backing == real
        # Two loop devices over overlapping parts of one file share data too.
        shares_file = span is not None and backing == span[0] and start < span[2] and span[1] < end
        if over_target or shares_file:
            dev = _read(loop / "dev")
            if dev and dev not in found:
                found.add(dev)
                if over_target:
                    # Partitions of a loop device over the target are the target's too.
                    found |= _users(f"/dev/{loop.name}", dev)
    return found


def check_target(path: str, image_size: int, mounts_path: str = MOUNTINFO) -> Target:
    """Return the target if it may be overwritten by an image of `image_size` bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not Path(path).parent.is_dir():
            raise TargetError(f"target {path}: no such file or directory") from None
        return Target(path, False, 0)
    except OSError as exc:
        raise TargetError(f"target {path}: {describe(exc)}") from None

    is_block = stat.S_ISBLK(info.st_mode)
    if not is_block and not stat.S_ISREG(info.st_mode):
        raise TargetError(f"target {path}: not a block device or a regular file")
    device = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}" if is_block else None
    size = _block_size(path) if is_block else info.st_size
    if is_block and size < image_size:
        raise TargetError(f"target {path} is too small: {size} bytes, the image needs {image_size}")

    mounts = read_mounts(mounts_path)
    users = _users(path, device)
    root = next((m for m in mounts if m.mount_point == "/"), None)
    if root is not None and device is not None:
        root_source_dev = _dev_of(root.source) if root.source.startswith("/dev/") and os.path.exists(root.source) else None
        root_devices = {root.device, _disk_of(root.device)}
        if root_source_dev:
            root_devices |= {root_source_dev, _disk_of(root_source_dev)}
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
