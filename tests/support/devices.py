"""Loop devices and mounts for tests, with cleanup that survives failing tests.

Loop devices are the engine's (imaging.base.tools); every one attached here is also
remembered together with its backing file, so a leaked one can be detached
later without ever touching a loop device that something else (the engine
under test, another process) attached.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from imaging.base.tools import attach_loop, detach_loop

from .requirements import requirement_missing

LOOP_CONTROL = Path("/dev/loop-control")
FUSE_DEVICE = Path("/dev/fuse")

# device path -> identity of its backing file, for devices loop_device() attached
_attached_loops: dict[str, str] = {}


def run(*command: object, input: bytes | None = None) -> str:
    """Run a command (arguments are passed through str()), returning its stdout.

    Raises RuntimeError carrying the command's stderr when it fails.
    """
    result = subprocess.run([str(part) for part in command], input=input, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, command))} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode()


@functools.cache
def loop_unavailable_reason() -> str | None:
    """Why loop devices cannot be used here, or None when they can."""
    if not LOOP_CONTROL.exists():
        return f"{LOOP_CONTROL} is missing: no loop device support"
    # `losetup -f` only looks up (or creates) a free device node, attaching nothing.
    probe = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"losetup cannot find a free loop device (needs root): {probe.stderr.strip()}"
    return None


@functools.cache
def fuse_unavailable_reason() -> str | None:
    """Why FUSE cannot be used here, or None when it can."""
    if not FUSE_DEVICE.exists():
        return f"{FUSE_DEVICE} is missing: no FUSE support"
    return None


def requires_loop() -> None:
    """Skip the calling test when loop devices are unavailable (fail it under CI)."""
    reason = loop_unavailable_reason()
    if reason:
        requirement_missing(reason)


def requires_root_loop_fuse() -> None:
    """Skip the calling test unless both loop devices and FUSE are usable (fail it under CI)."""
    reason = loop_unavailable_reason() or fuse_unavailable_reason()
    if reason:
        requirement_missing(reason)


def _backing_identity(device: str) -> str | None:
    """Device number and inode of the file behind a loop device, None if detached.

    Unlike the path this survives the backing file being deleted or renamed.
    """
    result = subprocess.run(
        ["losetup", "--noheadings", "--output", "BACK-MAJ:MIN,BACK-INO", device],
        capture_output=True,
        text=True,
    )
    identity = " ".join(result.stdout.split())
    return identity if result.returncode == 0 and identity else None


def _detach(device: str, backing_identity: str) -> bool:
    """Detach `device` if it still serves our file; True if it was attached."""
    del _attached_loops[device]
    # After a manual detach the device number may already serve someone else.
    if _backing_identity(device) != backing_identity:
        return False
    detach_loop(device)
    return True


@contextlib.contextmanager
def loop_device(
    path: str | os.PathLike,
    offset: int = 0,
    sizelimit: int | None = None,
    read_only: bool = False,
) -> Iterator[str]:
    """Attach `path` (bytes offset..offset+sizelimit) to a free loop device.

    Yields the device path, e.g. "/dev/loop3"; detaches it on exit, also on error.
    """
    device = attach_loop(path, offset, sizelimit, read_only=read_only)
    _attached_loops[device] = _backing_identity(device)
    try:
        yield device
    finally:
        if device in _attached_loops:
            _detach(device, _attached_loops[device])


def loops_attached_to(path: str | os.PathLike) -> list[str]:
    """The loop devices serving `path`, whoever attached them."""
    return run("losetup", "--noheadings", "--output", "NAME", "--associated", path).split()


def detach_leaked_loops() -> list[str]:
    """Detach loop devices that loop_device() attached and nobody detached.

    Returns the devices that were still attached.
    """
    return [
        device
        for device, backing_identity in list(_attached_loops.items())
        if _detach(device, backing_identity)
    ]


@contextlib.contextmanager
def mounted(
    device: str | os.PathLike, mountpoint: str | os.PathLike, read_only: bool = False
) -> Iterator[Path]:
    """Mount an ext4 filesystem; yields the mountpoint and unmounts on exit."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "ext4", "-o", "ro" if read_only else "rw", device, mountpoint)
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)


def _unmount(mountpoint: str | os.PathLike) -> None:
    """Unmount, falling back to a lazy unmount if something still holds it busy."""
    if subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True).returncode != 0:
        run("umount", "-l", mountpoint)
