"""A real disk with bad sectors: faulty_disk.c served over FUSE, seen through a loop device.

Reads overlapping a bad range fail with EIO at 512-byte precision; everything
else reads the bytes of the backing image. Also parses GNU ddrescue mapfiles so
tests can compare an engine's bad-sector map with ddrescue's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .devices import loop_device, run

SECTOR = 512
SOURCE = Path(__file__).with_name("faulty_disk.c")
# Inside the repo so the binary survives between sessions; keyed by source hash.
DEFAULT_BUILD_DIR = Path(__file__).resolve().parent.parent / ".build"
EXPOSED_FILE_NAME = "disk"
MOUNT_TIMEOUT = 10.0


def build_faulty_disk(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR) -> Path:
    """Compile faulty_disk.c unless this version of it is already built; returns the binary."""
    build_dir = Path(build_dir)
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = build_dir / f"faulty_disk-{digest}"
    if not binary.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        fuse_flags = run("pkg-config", "--cflags", "--libs", "fuse3").split()
        # Build under a private name and rename, so parallel test runs never see half a binary.
        partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
        run("gcc", "-O2", "-Wall", "-Wextra", "-o", partial, SOURCE, *fuse_flags)
        partial.replace(binary)
    return binary


@contextlib.contextmanager
def faulty_file(
    image_path: str | os.PathLike,
    bad_ranges: Iterable[tuple[int, int]],
    workdir: str | os.PathLike,
) -> Iterator[Path]:
    """Serve `image_path` as a read-only FUSE file failing reads that touch `bad_ranges`.

    bad_ranges holds (position, size) byte ranges. Yields the exposed file's
    path; on exit unmounts and reaps the FUSE process, also on error.
    """
    binary = build_faulty_disk()
    # Absolute and free of symlinks, to match the kernel's mount table.
    mountpoint = Path(tempfile.mkdtemp(prefix="faulty-", dir=workdir)).resolve()
    log_path = mountpoint.with_suffix(".log")
    ranges_argument = ",".join(f"{position}+{size}" for position, size in bad_ranges)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, image_path, ranges_argument, mountpoint], stdout=log, stderr=log
        )
    try:
        _wait_until_mounted(mountpoint, process, log_path)
        yield mountpoint / EXPOSED_FILE_NAME
    finally:
        if _is_mounted(mountpoint):
            _unmount_fuse(mountpoint)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        mountpoint.rmdir()


@contextlib.contextmanager
def faulty_disk(
    image_path: str | os.PathLike,
    bad_ranges: Iterable[tuple[int, int]],
    workdir: str | os.PathLike,
) -> Iterator[str]:
    """A read-only loop device over faulty_file(); yields its path, e.g. "/dev/loop4"."""
    with faulty_file(image_path, bad_ranges, workdir) as exposed_file, \
            loop_device(exposed_file, read_only=True) as device:
        yield device


def _wait_until_mounted(mountpoint: Path, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _is_mounted(mountpoint):
        if process.poll() is not None:
            raise RuntimeError(
                f"faulty_disk exited {process.returncode} before mounting: {log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"faulty_disk did not mount {mountpoint} within {MOUNT_TIMEOUT} s")
        time.sleep(0.01)


def _is_mounted(mountpoint: Path) -> bool:
    # Read the mount table instead of stat()ing the mountpoint, which would
    # wait on the FUSE process and fail once it is gone.
    escaped = (
        str(mountpoint).replace("\\", "\\134").replace(" ", "\\040")
        .replace("\t", "\\011").replace("\n", "\\012")
    )
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == escaped for line in mountinfo)


def _unmount_fuse(mountpoint: Path) -> None:
    # A just-detached loop device can hold the file for a moment longer.
    for _ in range(20):
        if subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    run("umount", "-l", mountpoint)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (position, size) ranges and merge those that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for position, size in sorted(ranges):
        if merged and position <= merged[-1][0] + merged[-1][1]:
            last_position, last_size = merged[-1]
            merged[-1] = (last_position, max(last_size, position + size - last_position))
        else:
            merged.append((position, size))
    return merged


def round_out_to_sectors(
    ranges: Iterable[tuple[int, int]], sector_size: int = SECTOR
) -> list[tuple[int, int]]:
    """The whole sectors that (position, size) ranges touch, merged."""
    rounded = []
    for position, size in ranges:
        start = position // sector_size * sector_size
        end = -(-(position + size) // sector_size) * sector_size
        rounded.append((start, end - start))
    return merge_ranges(rounded)


def ddrescue_bad_ranges(mapfile: str | os.PathLike) -> list[tuple[int, int]]:
    """The merged (position, size) ranges a GNU ddrescue mapfile marks bad-sector ('-')."""
    bad = []
    status_line_skipped = False
    for line in Path(mapfile).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # The first data line is "current_pos current_status [current_pass]".
        if not status_line_skipped:
            status_line_skipped = True
            continue
        position, size, status = line.split()[:3]
        if status == "-":
            bad.append((_ddrescue_number(position), _ddrescue_number(size)))
    return merge_ranges(bad)


def _ddrescue_number(text: str) -> int:
    # ddrescue reads these with strtoll base 0: 0x is hex, a leading 0 octal.
    if text.lower().startswith("0x"):
        return int(text, 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text, 8)
    return int(text)
