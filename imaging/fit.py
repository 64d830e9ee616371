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

import dataclasses
import json
import tempfile
from typing import Optional

from .base import tools
from .base.errors import ImagingError, TargetError
from .datastore.image import Image
from .disks.layout import SFDISK_PACKAGE
from .reading.filesystems import EXT, identify
from .reading.mount import ImageReader, Partition, label, partitions

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


def _sfdisk(target: str, *arguments: str, input: Optional[bytes] = None) -> str:
    return tools.run("sfdisk", SFDISK_PACKAGE, ["--no-reread", "--no-tell-kernel", *arguments,
                                                target], kind=TargetError, text=True, input=input,
                     failure=f"sfdisk {' '.join(arguments)} failed on {target}").stdout


def relocate_backup_header(image: Image, target: str, target_size: int) -> bool:
    """Move a GPT's backup header to the end of a larger target; whether there was one to move."""
    if label(image) != "gpt" or target_size <= image.size:
        return False
    _sfdisk(target, "--relocate", "gpt-bak-std")
    return True


def grow(growth: Growth, target: str) -> int:
    """Grow the partition to the end of the target and its filesystem with it; its new size."""
    number = growth.partition.number
    _sfdisk(target, "--force", "-N", str(number), input=b", +\n")
    table = json.loads(_sfdisk(target, "--json"))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    entry = next((p for p in table.get("partitions", []) if int(p["start"]) * sector ==
                  growth.partition.start), None)
    if entry is None:
        raise TargetError(f"partition {number} is gone from {target} after growing it")
    size = int(entry["size"]) * sector
    with tools.loop_device(target, growth.partition.start, size, kind=TargetError) as device:
        checked = tools.run("e2fsck", "e2fsprogs", ["-f", "-y", device], kind=TargetError,
                            text=True)
        # 1 and 2: errors corrected; 4 and up: some left, or the check failed.
        if checked.returncode >= 4:
            raise TargetError(f"e2fsck cannot make partition {number} of {target} consistent "
                              f"before growing it: {tools.complaint(checked)}")
        tools.run("resize2fs", "e2fsprogs", [device], kind=TargetError,
                  failure=f"resize2fs cannot grow partition {number} of {target}")
    return size
