"""The host's mounts and the devices stacked on a disk, as the kernel tells them.

The mount table is read from MOUNTINFO and the devices from SYS_BLOCK and
SYS_DEV_BLOCK, module constants that only tests point elsewhere, so that the
refusals built on them can be tested without going near this machine's disks.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..base.errors import TargetError, describe

MOUNTINFO = "/proc/self/mountinfo"
SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_BLOCK = Path("/sys/block")


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor"
    mount_point: str
    source: str


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


def device_number(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def block_device_of(path: str) -> Optional[str]:
    """"major:minor" if `path` is a block device node, else None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return device_number(info.st_rdev) if stat.S_ISBLK(info.st_mode) else None


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
        loops.append(_Loop(device, real, block_device_of(real), start, end))
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


def users(path: str, device: Optional[str]) -> set[str]:
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
