"""Fitting a restored disk to a larger target, with util-linux and e2fsprogs.

A GPT keeps a backup header in the disk's last sector: restored onto a larger
disk, that header sits short of the end until `sfdisk --relocate gpt-bak-std`
moves it there (and widens the usable area). A dos (MBR) label has no backup
header and needs nothing. Growing makes the last partition end at the disk's
end (`sfdisk -N`) and its ext2/3/4 filesystem fill it (e2fsck -fy, then
resize2fs, through a loop device over the partition's bytes). The kernel is
not asked to re-read the table, as the restore itself does not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import tempfile
from typing import Iterator, Optional

from .errors import ImagingError, TargetError, running
from .filesystems import EXT, identify
from .image import Image
from .layout import SFDISK_PACKAGE
from .mount import ImageReader, Partition, label, partitions

# Enough of a partition's start for blkid to recognise every filesystem it knows.
PROBE_BYTES = 1024 * 1024
# Partition numbers past the four primaries of a dos label are logical ones.
DOS_PRIMARIES = 4


@dataclasses.dataclass(frozen=True)
class Growth:
    partition: Partition
    filesystem: str


def plan_growth(image: Image) -> Growth:
    """What --grow would grow: the last partition, which must hold ext2/3/4; refused otherwise."""
    table = label(image)
    parts = partitions(image)
    if table not in ("gpt", "dos") or not parts:
        raise ImagingError(f"cannot grow {image.path}: the image has no GPT or dos partition table")
    last = max(parts, key=lambda part: part.end)
    if table == "dos" and last.number > DOS_PRIMARIES:
        raise ImagingError(f"cannot grow partition {last.number}: it is a logical partition "
                           "inside an extended one")
    kind = _probe(ImageReader(image), last)
    if kind not in EXT:
        raise ImagingError(f"cannot grow partition {last.number}: it holds "
                           f"{kind or 'no filesystem blkid recognises'}, and only ext2, ext3 "
                           "and ext4 filesystems are grown")
    return Growth(last, kind)


def _probe(reader: ImageReader, part: Partition) -> Optional[str]:
    """The filesystem type at the start of the partition, from a sparse copy of its first MiB."""
    with tempfile.NamedTemporaryFile(prefix="imaging-probe-") as copy:
        copy.write(reader.pread(part.start, min(part.size, PROBE_BYTES)))
        copy.truncate(part.size)
        copy.flush()
        return identify(copy.name)


def _tool(tool: str, package: str, arguments: list[str],
          input: Optional[str] = None) -> subprocess.CompletedProcess:
    with running(tool, package, TargetError):
        return subprocess.run([tool, *arguments], capture_output=True, text=True, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)


def _sfdisk(target: str, *arguments: str, input: Optional[str] = None) -> str:
    done = _tool("sfdisk", SFDISK_PACKAGE, ["--no-reread", "--no-tell-kernel", *arguments, target],
                 input)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise TargetError(f"sfdisk {' '.join(arguments)} failed on {target}: "
                          f"{lines[-1] if lines else 'no reason given'}")
    return done.stdout


def relocate_backup_header(image: Image, target: str, target_size: int) -> bool:
    """Move a GPT's backup header to the end of a larger target; whether there was one to move."""
    if label(image) != "gpt" or target_size <= image.size:
        return False
    _sfdisk(target, "--relocate", "gpt-bak-std")
    return True


def grow(growth: Growth, target: str) -> int:
    """Grow the partition to the end of the target and its filesystem with it; its new size."""
    number = growth.partition.number
    _sfdisk(target, "--force", "-N", str(number), input=", +\n")
    table = json.loads(_sfdisk(target, "--json"))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    entry = next((p for p in table.get("partitions", []) if int(p["start"]) * sector ==
                  growth.partition.start), None)
    if entry is None:
        raise TargetError(f"partition {number} is gone from {target} after growing it")
    size = int(entry["size"]) * sector
    with _loop_device(target, growth.partition.start, size) as device:
        checked = _tool("e2fsck", "e2fsprogs", ["-f", "-y", device])
        # 1 and 2: errors corrected; 4 and up: some left, or the check failed.
        if checked.returncode >= 4:
            raise TargetError(f"e2fsck cannot make partition {number} of {target} consistent "
                              f"before growing it: {_last_line(checked)}")
        resized = _tool("resize2fs", "e2fsprogs", [device])
        if resized.returncode != 0:
            raise TargetError(f"resize2fs cannot grow partition {number} of {target}: "
                              f"{_last_line(resized)}")
    return size


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


@contextlib.contextmanager
def _loop_device(path: str, offset: int, size: int) -> Iterator[str]:
    done = _tool("losetup", "util-linux", ["-f", "--show", "-o", str(offset), "--sizelimit",
                                           str(size), path])
    if done.returncode != 0:
        raise TargetError(f"cannot attach a loop device to {path}: {_last_line(done)}")
    device = done.stdout.strip()
    try:
        yield device
    finally:
        detached = _tool("losetup", "util-linux", ["-d", device])
        if detached.returncode != 0:
            raise TargetError(f"cannot detach {device}: {_last_line(detached)}")
