"""Which filesystem a partition holds, and checking it read-only with its own tool.

Identification is blkid's low-level probe. A check runs the filesystem's own
checker in its no-changes mode on the partition (or LVM logical volume) as a
private read-only FUSE mount exposes it (mount.exposed): e2fsck -fn for
ext2/3/4, fsck.vfat -n for FAT, ntfsfix -n for NTFS, xfs_repair -n for XFS,
btrfs check --readonly for Btrfs. Anything else is reported as not checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..base import tools
from ..base.errors import Cancelled
from ..base.progress import Progress
from ..datastore.image import Image
from ..datastore.verification import CLEAN, DIRTY, NOT_CHECKED, FilesystemCheck
from .mount import Partition, exposed

EXT = ("ext2", "ext3", "ext4")
# filesystem type (as blkid names it) -> (checker, Debian package, arguments before the device)
_CHECKERS = {
    **{kind: ("e2fsck", "e2fsprogs", ["-f", "-n"]) for kind in EXT},
    "vfat": ("fsck.vfat", "dosfstools", ["-n"]),
    "ntfs": ("ntfsfix", "ntfs-3g", ["-n"]),
    "xfs": ("xfs_repair", "xfsprogs", ["-n", "-f"]),  # -f: the partition is a file here
    "btrfs": ("btrfs", "btrfs-progs", ["check", "--readonly"]),
}


def identify(device: Path) -> Optional[str]:
    """The filesystem type blkid finds on `device` ("ext4", "vfat", "ntfs", ...), None if none."""
    found = tools.run("blkid", "util-linux", ["-p", "-s", "TYPE", "-o", "value", str(device)],
                      text=True)
    kind = found.stdout.strip()
    return kind if found.returncode == 0 and kind else None


def check(device: Path, part: Partition) -> FilesystemCheck:
    """Check the filesystem on `device`, the image's partition or volume `part`, without
    changing it. Its name (p1, vg0-root) stands for the device's temporary path in the detail.
    """
    kind = identify(device)
    if kind not in _CHECKERS:
        return FilesystemCheck(part.number, kind, NOT_CHECKED,
                               f"no checker for {kind}" if kind else "no filesystem found",
                               part.volume)
    tool, package, arguments = _CHECKERS[kind]
    done = tools.run(tool, package, [*arguments, str(device)], text=True)
    # The summary is the last line on stdout (e2fsck puts its banner on stderr).
    detail = (tools.last_line(done.stdout) or tools.complaint(done)).replace(str(device),
                                                                              part.name)
    return FilesystemCheck(part.number, kind, CLEAN if done.returncode == 0 else DIRTY, detail,
                           part.volume)


def check_image(image: Image, progress: Progress) -> list[FilesystemCheck]:
    """Check every partition of the image through a private read-only mount of it.

    The caller registers as the image's reader. Progress counts partition bytes.
    """
    with exposed(image) as exposure:
        parts = exposure.partitions + exposure.volumes
        progress.start_phase("fsck", sum(part.size for part in parts))
        results = []
        for part in parts:
            if progress.cancelled():
                raise Cancelled()
            results.append(check(exposure.path(part), part))
            progress.advance(part.size)
    return results
