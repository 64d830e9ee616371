"""Used-block maps: which bytes of a disk hold data, for `used` mode backups.

Each partition's filesystem, as `blkid -p` identifies it, says which of its
blocks are free: ext2/3/4 through dumpe2fs's free-block lists (instant),
other filesystems through partclone's domain maps (each partclone run can
sleep a second or two in its progress thread, so partitions are mapped
concurrently), Linux swap by keeping only its header page. A byte is skipped
only when a filesystem positively says it is free; partition tables, gaps,
space outside the partitions and every partition that cannot be mapped are
read in full, and the manifest says why for each partition.

Mapping can take a while (partclone on a large NTFS or btrfs): every tool
runs under a cancel poll, and a cancel kills the running tools at once.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..base import tools
from ..base.errors import ImagingError, SourceError, SourceInUse, translated
from . import layout, lvm, mounts
from .device import Range, Source, merge

# blkid TYPE -> the partclone.<tool> that maps that filesystem.
PARTCLONE_TOOLS = {
    "vfat": "fat", "exfat": "exfat", "ntfs": "ntfs", "btrfs": "btrfs", "xfs": "xfs",
    "f2fs": "f2fs", "hfsplus": "hfsp", "apfs": "apfs", "minix": "minix", "reiser4": "reiser4",
}
EXT_TYPES = {"ext2", "ext3", "ext4", "ext4dev"}
# The kernel writes the swap signature in the last 10 bytes of the first page,
# whatever the page size of the machine that ran mkswap.
SWAP_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
SWAP_SIGNATURES = (b"SWAPSPACE2", b"SWAP-SPACE")
# DOS extended partitions only contain the logical partitions and their EBRs.
DOS_EXTENDED_TYPES = {"5", "f", "85"}
MAX_CONCURRENT_MAPS = 8
# Tools' messages are parsed, so they must not be translated.
TOOL_ENV = dict(os.environ, LC_ALL="C")
CancelPoll = Callable[[], bool]

METHOD_DUMPE2FS = "dumpe2fs"
METHOD_PARTCLONE = "partclone"
METHOD_SWAP = "swap-header"
METHOD_EXTENDED = "extended: holds logical partitions, which are mapped on their own"
METHOD_LVM = "lvm: its volumes mapped on their own, free extents skipped"
LVM_MEMBER = "LVM2_member"
# blkid TYPE -> how people name it: encrypted volumes, and members of what partclone
# cannot map (read in full, said so).
ENCRYPTION_NAMES = {"crypto_LUKS": "LUKS", "BitLocker": "BitLocker", "VeraCrypt": "VeraCrypt"}
MEMBER_NAMES = {
    "linux_raid_member": "an md RAID member: its array is read whole, as the disk holds it",
    "zfs_member": "a ZFS pool member: partclone cannot map ZFS",
    "ddf_raid_member": "a hardware RAID (DDF) member",
    "isw_raid_member": "an Intel RAID member",
}


def _never() -> bool:
    return False


class Unmappable(ImagingError):
    """Why a partition is read in full."""


@dataclasses.dataclass
class VolumeMap:
    """An LVM logical volume of a PV partition, mapped as a partition is."""

    name: str  # "vg0/root"
    start: int  # absolute; 0 for a volume that is not one range of the disk
    size: int
    filesystem: Optional[str]
    mapped: str
    free: list[Range]
    linear: bool  # readable as a volume (lvm.LogicalVolume.pieces), one range or several


@dataclasses.dataclass
class PartitionMap:
    number: int
    start: int
    size: int
    filesystem: Optional[str]
    mapped: str  # a METHOD_* or layout.FULL_PREFIX and why
    free: list[Range]  # absolute ranges its filesystem says hold nothing
    volumes: list[VolumeMap] = dataclasses.field(default_factory=list)  # of an LVM2 PV

    @property
    def is_container(self) -> bool:
        return self.mapped == METHOD_EXTENDED


@dataclasses.dataclass
class UsedPlan:
    """What a `used` backup reads: merged absolute ranges, and why per partition."""

    read: list[Range]
    partitions: list[PartitionMap]
    forced_past: Optional[str] = None  # the read-write mount a forced backup went past

    def __post_init__(self) -> None:
        self._starts = [start for start, _ in self.read]

    def wanted(self, offset: int, length: int) -> list[Range]:
        """The backup's read plan: the ranges to read inside one chunk."""
        end = offset + length
        index = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        ranges = []
        while index < len(self.read) and self.read[index][0] < end:
            start, size = self.read[index]
            low, high = max(start, offset), min(start + size, end)
            if high > low:
                ranges.append((low, high - low))
            index += 1
        return ranges

    def manifest_extra(self) -> dict:
        extra = {
            "read_map": [[start, size] for start, size in self.read],
            "read_bytes": sum(size for _, size in self.read),
            "partitions": [{
                "number": part.number, "start": part.start, "size": part.size,
                "filesystem": part.filesystem,
                "used_bytes": _overlap(self.read, part.start, part.size),
                "mapped": part.mapped,
                **({"volumes": [{
                    "name": volume.name, "start": volume.start, "size": volume.size,
                    "filesystem": volume.filesystem, "mapped": volume.mapped,
                    "linear": volume.linear,
                    "used_bytes": _overlap(self.read, volume.start, volume.size)
                    if volume.start else volume.size,
                } for volume in part.volumes]} if part.volumes else {}),
            } for part in self.partitions],
        }
        if self.forced_past:
            extra["forced_past_mount"] = self.forced_past
        return extra


def plan(source: Source, force: bool = False, mounts_path: str = mounts.MOUNTINFO,
         cancelled: CancelPoll = _never) -> UsedPlan:
    """Map every partition of `source` and decide what a `used` backup reads.

    `cancelled` is polled while the tools run; when it says so, they are
    killed and Cancelled is raised.
    """
    mounted = mounted_read_write(source.path, mounts_path)
    if mounted and not force:
        raise SourceInUse(f"{source.path} is mounted read-write ({mounted}): its block bitmaps "
                          "could change during a used-mode read; unmount it, or force the "
                          "backup to image it in use")
    entries = layout.partitions(source.path)
    with translated(SourceError, f"cannot map the used blocks of {source.path}"), \
            concurrent.futures.ThreadPoolExecutor(
                max(1, min(len(entries), MAX_CONCURRENT_MAPS)), thread_name_prefix="map") as pool:
        maps = list(pool.map(lambda entry: map_partition(source, entry, cancelled), entries))
    return UsedPlan(read_ranges(source.size, source.sector_size, maps), maps, mounted)


def mounted_read_write(source_path: str, mounts_path: str = mounts.MOUNTINFO) -> Optional[str]:
    """Where the source, or a device over any part of it, is mounted read-write."""
    with translated(SourceError, f"cannot tell whether {source_path} is mounted"):
        return _mounted_read_write(source_path, mounts_path)


def _mounted_read_write(source_path: str, mounts_path: str) -> Optional[str]:
    info = os.stat(source_path)
    device = (f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
              if stat.S_ISBLK(info.st_mode) else None)
    users = mounts.users(source_path, device)
    for mount in mounts.read_mounts(mounts_path):
        if mount.device in users and not _read_only(mount.mount_point):
            return f"{mount.source or mount.device} at {mount.mount_point}"
    return None


def _read_only(mount_point: str) -> bool:
    try:
        return bool(os.statvfs(mount_point).f_flag & os.ST_RDONLY)
    except OSError:
        return False  # cannot tell: assume the worst


def read_ranges(disk_size: int, sector_size: int, maps: list[PartitionMap]) -> list[Range]:
    """Everything but the bytes some filesystem calls free and no other partition needs.

    Overlapping partitions (a damaged table) thus never lose each other's data;
    skipped spans shrink to whole sectors so every read stays sector aligned.
    """
    filesystems = [m for m in maps if not m.is_container]
    needed = merge([kept for m in filesystems
                    for kept in subtract([(m.start, m.size)], merge(m.free))])
    skipped = subtract(merge([r for m in filesystems for r in m.free]), needed)
    aligned = []
    for start, size in skipped:
        low = -(-start // sector_size) * sector_size
        high = (start + size) // sector_size * sector_size
        if high > low:
            aligned.append((low, high - low))
    return subtract([(0, disk_size)], aligned)


def subtract(ranges: list[Range], minus: list[Range]) -> list[Range]:
    """`ranges` without `minus`; both sorted and merged."""
    result = []
    index = 0
    for start, size in ranges:
        end = start + size
        while index < len(minus) and minus[index][0] + minus[index][1] <= start:
            index += 1
        cursor, scan = start, index
        while scan < len(minus) and minus[scan][0] < end:
            cut_start, cut_size = minus[scan]
            if cut_start > cursor:
                result.append((cursor, cut_start - cursor))
            cursor = max(cursor, cut_start + cut_size)
            scan += 1
        if cursor < end:
            result.append((cursor, end - cursor))
    return result


def _overlap(ranges: list[Range], start: int, size: int) -> int:
    end = start + size
    return sum(max(0, min(s + n, end) - max(s, start)) for s, n in ranges)


def map_partition(source: Source, entry: dict, cancelled: CancelPoll = _never) -> PartitionMap:
    """One partition as sfdisk --json lists it, with the free ranges its filesystem names."""
    sector = entry.get("sectorsize", 512)
    start, size = entry["start"] * sector, entry["size"] * sector
    number_match = re.search(r"(\d+)$", entry.get("node", ""))
    number = int(number_match.group(1)) if number_match else 0
    if entry.get("label") == "dos" and entry.get("type", "").lower() in DOS_EXTENDED_TYPES:
        return PartitionMap(number, start, size, None, METHOD_EXTENDED, [])
    return PartitionMap(number, start, size,
                        *_mapped(source, start, size, "partition", cancelled, volumes=True))


def _mapped(source: Source, start: int, size: int, what: str, cancelled: CancelPoll, *,
            volumes: bool = False) -> tuple[Optional[str], str, list[Range], list[VolumeMap]]:
    """(filesystem, how it was mapped, free ranges, logical volumes) of the partition or
    logical volume `what` at start..start+size; read in full, saying why, if it cannot be
    mapped. With `volumes`, an LVM2 PV's volumes are mapped on their own."""
    filesystem = None
    try:
        if start + size > source.size:
            raise Unmappable(f"{what} extends past the end of the disk")
        filesystem, usage, version = probe(source.path, start, size, cancelled)
        if volumes and filesystem == LVM_MEMBER:
            return _map_physical_volume(source, start, size, cancelled)
        free, method = _free_ranges(source, start, size, filesystem, usage, version, cancelled)
    except Unmappable as reason:
        return filesystem, f"{layout.FULL_PREFIX}{reason}", [], []
    return filesystem, method, free, []


def _map_physical_volume(source: Source, start: int, size: int, cancelled: CancelPoll
                         ) -> tuple[str, str, list[Range], list[VolumeMap]]:
    """An LVM2 PV: its label and metadata read in full, its free extents skipped, each
    logical volume that is one range of it mapped as a partition is (one in several
    ranges is read in full: partclone and dumpe2fs read a device, and a loop device shows
    one range)."""
    def read(offset: int, length: int) -> bytes:
        try:
            return os.pread(source.fd, length, start + offset)
        except OSError as exc:
            raise Unmappable(f"cannot read its LVM metadata: {exc.strerror}") from None

    try:
        pv = lvm.read_pv(read, size)
    except lvm.LvmError as exc:
        raise Unmappable(f"LVM2 PV: {exc}") from None
    volumes = [_map_volume(source, start, volume, cancelled) for volume in pv.volumes]
    free = merge([(start + offset, length) for offset, length in pv.free()]
                 + [kept for volume in volumes for kept in volume.free])
    return LVM_MEMBER, METHOD_LVM, free, volumes


def _map_volume(source: Source, pv_start: int, volume: lvm.LogicalVolume,
                cancelled: CancelPoll) -> VolumeMap:
    if not volume.contiguous:
        return VolumeMap(volume.name, 0, volume.size, None,
                         f"{layout.FULL_PREFIX}{volume.layout}", [], bool(volume.pieces))
    start = pv_start + volume.start
    filesystem, mapped, free, _ = _mapped(source, start, volume.size, "volume", cancelled)
    return VolumeMap(volume.name, start, volume.size, filesystem, mapped, free, True)


def probe(path: str, start: int, size: int, cancelled: CancelPoll = _never
          ) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(TYPE, USAGE, VERSION) that `blkid -p` finds at start..start+size; TYPE None if
    nothing."""
    result = _run("blkid", "util-linux", ["--probe", "--output", "export", "--offset",
                                          str(start), "--size", str(size), path], cancelled)
    if result.returncode == 2:
        return None, None, None
    if result.returncode == 8:
        raise Unmappable("blkid finds signatures of more than one filesystem")
    if result.returncode != 0:
        raise Unmappable(f"blkid failed: {tools.complaint(result)}")
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if "TYPE" not in found and "PTTYPE" in found:
        raise Unmappable(f"holds a partition table ({found['PTTYPE']})")
    return found.get("TYPE"), found.get("USAGE"), found.get("VERSION")


def _free_ranges(source: Source, start: int, size: int, filesystem: Optional[str],
                 usage: Optional[str], version: Optional[str],
                 cancelled: CancelPoll) -> tuple[list[Range], str]:
    if filesystem is None:
        raise Unmappable("no filesystem recognised")
    if usage == "crypto":
        named = ENCRYPTION_NAMES.get(filesystem, filesystem)
        if named == "LUKS" and version:
            named += version  # LUKS1 or LUKS2
        raise Unmappable(f"encrypted ({named}): its files need its passphrase")
    if filesystem in MEMBER_NAMES:
        raise Unmappable(MEMBER_NAMES[filesystem])
    if filesystem == "swap":
        return swap_free(source, start, size), METHOD_SWAP
    if filesystem == "swsuspend":
        raise Unmappable("swap holding a hibernation image")
    if filesystem in EXT_TYPES:
        with tools.loop_device(source.path, start, size, read_only=True, kind=Unmappable) as device:
            return ext_free(device, start, size, cancelled), METHOD_DUMPE2FS
    tool = PARTCLONE_TOOLS.get(filesystem)
    if tool is None:
        raise Unmappable(f"partclone cannot map {filesystem}")
    with tools.loop_device(source.path, start, size, read_only=True, kind=Unmappable) as device:
        return partclone_free(tool, device, start, size, cancelled), METHOD_PARTCLONE


def swap_free(source: Source, start: int, size: int) -> list[Range]:
    """Everything after the swap header page, whose size the signature's place tells."""
    try:
        head = os.pread(source.fd, min(size, SWAP_PAGE_SIZES[-1]), start)
    except OSError as exc:
        raise Unmappable(f"cannot read the swap header: {exc.strerror}") from None
    for page in SWAP_PAGE_SIZES:
        if head[page - 10:page] in SWAP_SIGNATURES:
            return [(start + page, size - page)] if size > page else []
    raise Unmappable("no swap signature at the end of a page")


def ext_free(device: str, start: int, size: int, cancelled: CancelPoll = _never) -> list[Range]:
    """Free blocks of an ext2/3/4 filesystem from dumpe2fs's block bitmaps."""
    result = _run("dumpe2fs", "e2fsprogs", [device], cancelled)
    if result.returncode != 0:
        raise Unmappable(f"dumpe2fs failed: {tools.complaint(result)}")
    header, group_marker, groups = result.stdout.partition("\nGroup 0:")
    fields = {}
    for line in header.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields[name.strip()] = value.strip()
    try:
        block_size = int(fields["Block size"])
        # bigalloc: dumpe2fs names each free run's last cluster by its first block.
        cluster_blocks = int(fields.get("Cluster size", block_size)) // block_size
        block_count = int(fields["Block count"])
        first_block = int(fields["First block"])
        blocks_per_group = int(fields["Blocks per group"])
        state = fields["Filesystem state"]
        features = fields["Filesystem features"].split()
    except (KeyError, ValueError):
        raise Unmappable("dumpe2fs printed no superblock summary") from None
    if "needs_recovery" in features:
        raise Unmappable("its journal needs recovery (not cleanly unmounted)")
    if state != "clean":
        raise Unmappable(f"filesystem state is '{state}'")
    # A bitmap dumpe2fs cannot read leaves its group without a "Free blocks:" line.
    group_count = -(-(block_count - first_block) // blocks_per_group)
    free_lists = re.findall(r"^  Free blocks: (.*)$", group_marker + groups, re.MULTILINE)
    if len(free_lists) != group_count:
        raise Unmappable(f"dumpe2fs listed free blocks for {len(free_lists)} "
                         f"of {group_count} block groups")
    free = []
    for listed in free_lists:
        for item in filter(None, (part.strip() for part in listed.split(","))):
            first, _, last = item.partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise Unmappable(f"dumpe2fs lists unreadable free blocks {item!r}") from None
            high = min(high + cluster_blocks - 1, block_count - 1)
            if not first_block <= low <= high:
                raise Unmappable(f"dumpe2fs lists free blocks {item} outside the filesystem")
            free.append((start + low * block_size, (high - low + 1) * block_size))
    return _clip(merge(free), start, size)


def partclone_free(tool: str, device: str, start: int, size: int,
                   cancelled: CancelPoll = _never) -> list[Range]:
    """The ranges partclone's domain map of the partition does not mark used ('+')."""
    with tempfile.TemporaryDirectory(prefix="imaging-map-") as scratch:
        domain = Path(scratch, "domain.map")
        result = _run(f"partclone.{tool}", "partclone",
                      ["--domain", "--quiet", "--source", device, "--output", str(domain),
                       "--logfile", str(Path(scratch, "partclone.log")),
                       f"--offset_domain={start}"], cancelled)
        if result.returncode != 0:
            # Its own lines ("Partclone fail, please check the log") hide the reason.
            messages = "\n".join(line for line in result.stderr.splitlines()
                                  if not line.startswith("Partclone"))
            raise Unmappable(f"partclone.{tool} failed: "
                             f"{tools.last_line(messages) or result.returncode}")
        try:
            text = domain.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise Unmappable(f"partclone.{tool} wrote no readable domain map ({exc})") from None
    free, used = parse_domain(text)
    if not used:
        raise Unmappable(f"partclone.{tool} marked no block as used")
    for low, length in free + used:
        if low < start or low + length > start + size:
            raise Unmappable(f"partclone.{tool}'s map reaches outside the partition")
    return merge(free)


def parse_domain(text: str) -> tuple[list[Range], list[Range]]:
    """(not-used ranges, used ranges) of a ddrescue domain mapfile ('+' means used)."""
    free, used = [], []
    rows = [line.split("#", 1)[0].split() for line in text.splitlines()]
    rows = [fields for fields in rows if fields]
    # The first row is the current position and status, not a block.
    for fields in rows[1:]:
        try:
            span, status = (int(fields[0], 0), int(fields[1], 0)), fields[2]
        except (IndexError, ValueError):
            raise Unmappable(f"unreadable domain map line: {' '.join(fields)}") from None
        (used if status == "+" else free).append(span)
    return free, used


def _clip(ranges: list[Range], start: int, size: int) -> list[Range]:
    end = start + size
    return [(max(s, start), min(s + n, end) - max(s, start))
            for s, n in ranges if s < end and s + n > start]


def _run(tool: str, package: str, arguments: list[str],
         cancelled: CancelPoll) -> subprocess.CompletedProcess:
    """Run a mapping tool under the cancel poll; one that cannot start leaves its partition
    to be read in full."""
    return tools.run(tool, package, arguments, kind=Unmappable, text=True, env=TOOL_ENV,
                     cancelled=cancelled)
