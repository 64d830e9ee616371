"""The engine's FUSE mounts in tests: `imaging mount` as a process, and leftovers undone.

Every mount a test makes, and every private mount the engine makes for files,
extract or verify --fsck, is a "fuse.imaging" entry of the mount table. A test
that fails half-way may leave one: `unmount_own_image_mounts` undoes those of
this test (fusermount3 -u, then a lazy unmount if it is busy), and only those:
other test runs on the same machine have theirs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaging.reading.mount import PRIVATE_MOUNT_PREFIX

from .devices import requires_root_loop_fuse

REPO = Path(__file__).resolve().parent.parent.parent
FUSE_TYPE = "fuse.imaging"


def image_mounts() -> set[str]:
    """Mount points of every image mounted through the engine on this machine."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split()[:1] == [FUSE_TYPE]:
            found.add(before.split()[4].encode().decode("unicode_escape"))
    return found


def own_image_mounts(test_dir: str | os.PathLike) -> set[str]:
    """Image mounts under `test_dir`, and the engine's private mounts made by this process."""
    private = f"{PRIVATE_MOUNT_PREFIX}{os.getpid()}-"
    return {mountpoint for mountpoint in image_mounts()
            if Path(mountpoint).is_relative_to(test_dir)
            or Path(mountpoint).name.startswith(private)}


def unmount(mountpoint: str | os.PathLike) -> None:
    """Unmount, falling back to a lazy unmount if something still holds it busy."""
    if subprocess.run(["fusermount3", "-u", os.fspath(mountpoint)],
                      capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True)


def unmount_own_image_mounts(test_dir: str | os.PathLike) -> list[str]:
    """Unmount what `own_image_mounts` finds; returns those mount points."""
    leftovers = sorted(own_image_mounts(test_dir))
    for mountpoint in leftovers:
        unmount(mountpoint)
    return leftovers


@contextlib.contextmanager
def mount_process(image_dir: str | os.PathLike, mountpoint: str | os.PathLike,
                  timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """`python -m imaging mount IMAGE DIR` while the block runs; yields the process once mounted.

    Whatever happens in the block, the mount is undone and the process reaped.
    """
    requires_root_loop_fuse()
    mountpoint = Path(mountpoint)
    process = subprocess.Popen([sys.executable, "-m", "imaging", "mount", str(image_dir),
                                str(mountpoint)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint) or not (mountpoint / "disk").exists():
            if process.poll() is not None:
                raise AssertionError(f"imaging mount exited {process.returncode}: "
                                     f"{process.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("imaging mount did not mount in time")
            time.sleep(0.05)
        yield process
    finally:
        if os.path.ismount(mountpoint):
            unmount(mountpoint)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path):
    """Autouse where imported: fails a test that leaves an image mounted, after undoing it."""
    yield
    leftovers = unmount_own_image_mounts(tmp_path)
    assert not leftovers, f"left mounted: {leftovers}"
