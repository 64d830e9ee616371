"""Which filesystem a partition holds, and checking it read-only with its own tool.

Identification is blkid's low-level probe. A check runs the filesystem's own
checker in its no-changes mode on the partition as a private read-only FUSE
mount exposes it (mount.exposed): e2fsck -fn for ext2/3/4, fsck.vfat -n for
FAT, ntfsfix -n for NTFS. Anything else is reported as not checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..base import tools
from ..base.errors import Cancelled
from ..base.progress import Progress
from ..datastore.image import Image
from ..datastore.verification import CLEAN, DIRTY, NOT_CHECKED, FilesystemCheck
from .mount import exposed

EXT = ("ext2", "ext3", "ext4")
# filesystem type (as blkid names it) -> (checker, Debian package, arguments before the device)
_CHECKERS = {
    **{kind: ("e2fsck", "e2fsprogs", ["-f", "-n"]) for kind in EXT},
    "vfat": ("fsck.vfat", "dosfstools", ["-n"]),
    "ntfs": ("ntfsfix", "ntfs-3g", ["-n"]),
}


def identify(device: Path) -> Optional[str]:
    """The filesystem type blkid finds on `device` ("ext4", "vfat", "ntfs", ...), None if none."""
    found = tools.run("blkid", "util-linux", ["-p", "-s", "TYPE", "-o", "value", str(device)],
                      text=True)
    kind = found.stdout.strip()
    return kind if found.returncode == 0 and kind else None


def check(device: Path, number: int, shown_as: str) -> FilesystemCheck:
    """Check the filesystem on `device` without changing it.

    `shown_as` (p1, p2, ...) stands for the device's temporary path in the detail.
    """
    kind = identify(device)
    if kind not in _CHECKERS:
        return FilesystemCheck(number, kind, NOT_CHECKED,
                               f"no checker for {kind}" if kind else "no filesystem found")
    tool, package, arguments = _CHECKERS[kind]
    done = tools.run(tool, package, [*arguments, str(device)], text=True)
    # The summary is the last line on stdout (e2fsck puts its banner on stderr).
    detail = (tools.last_line(done.stdout) or tools.complaint(done)).replace(str(device), shown_as)
    return FilesystemCheck(number, kind, CLEAN if done.returncode == 0 else DIRTY, detail)


def check_image(image: Image, progress: Progress) -> list[FilesystemCheck]:
    """Check every partition of the image through a private read-only mount of it.

    The caller registers as the image's reader. Progress counts partition bytes.
    """
    with exposed(image) as exposure:
        parts = exposure.partitions
        progress.start_phase("fsck", sum(part.size for part in parts))
        results = []
        for part in parts:
            if progress.cancelled():
                raise Cancelled()
            results.append(check(exposure.path(part), part.number, part.name))
            progress.advance(part.size)
    return results
