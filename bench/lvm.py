"""LVM2 disks for the tests and the benchmark, built by LVM's own tools without
device-mapper: `pvcreate` and `vgcreate` write the PV and its volume group; the logical
volumes are added to the group's text metadata (as `vgcfgbackup` writes it) and written
back with `vgcfgrestore`, since `lvcreate` would need device-mapper to activate them.
Filesystems are made at the LVs' offsets through loop devices. LVM runs with a
configuration folder of the caller's own (LVM_SYSTEM_DIR: no backup or archive left in
/etc/lvm) and sees only the PV's loop device (--devices)."""
from __future__ import annotations

import dataclasses
import os
import secrets
import string
import subprocess
from pathlib import Path

from bench.system import MiB
from imaging.base.tools import loop_device

EXTENT = 4 * MiB
# pvcreate's default: the first extent 1 MiB into the PV.
PE_START = MiB
LVM_CONF = "backup {\n backup = 0\n archive = 0\n}\n"
TOOLS = ("pvcreate", "vgcreate", "vgcfgbackup", "vgcfgrestore")


@dataclasses.dataclass(frozen=True)
class Volume:
    name: str
    first_extent: int
    extents: int
    # (first extent, extents) of each further segment, as `lvextend` adds them
    more: tuple[tuple[int, int], ...] = ()

    def offset(self, pv_start: int) -> int:
        """Bytes from the disk's start (to its first segment)."""
        return pv_start + PE_START + self.first_extent * EXTENT

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(first extent, extents) of each segment, in the volume's order."""
        return [(self.first_extent, self.extents), *self.more]

    def pieces(self, pv_start: int) -> list[tuple[int, int]]:
        """(bytes from the disk's start, length) of each segment, in the volume's order."""
        return [(pv_start + PE_START + first * EXTENT, count * EXTENT)
                for first, count in self.segments]

    @property
    def size(self) -> int:
        return sum(count for _, count in self.segments) * EXTENT


def _uuid() -> str:
    alphabet = string.ascii_letters + string.digits
    text = "".join(secrets.choice(alphabet) for _ in range(32))
    groups = (6, 4, 4, 4, 4, 4, 6)
    parts, position = [], 0
    for length in groups:
        parts.append(text[position:position + length])
        position += length
    return "-".join(parts)


def _segments_text(volume: Volume) -> str:
    text, start = "", 0
    for number, (first, count) in enumerate(volume.segments, start=1):
        text += f"""
\t\t\tsegment{number} {{
\t\t\t\tstart_extent = {start}
\t\t\t\textent_count = {count}
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", {first}]
\t\t\t}}"""
        start += count
    return text


def _volumes_text(volumes: list[Volume]) -> str:
    sections = "".join(f"""
\t\t{volume.name} {{
\t\t\tid = "{_uuid()}"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = {len(volume.segments)}{_segments_text(volume)}
\t\t}}
""" for volume in volumes)
    return f"\n\tlogical_volumes {{\n{sections}\n\t}}\n"


def make_physical_volume(disk: Path, start: int, size: int, group: str,
                         volumes: list[Volume], scratch: Path) -> None:
    """Make the bytes start..start+size of `disk` an LVM2 PV of `group` holding `volumes`."""
    system = scratch / "lvm"
    system.mkdir(exist_ok=True)
    (system / "lvm.conf").write_text(LVM_CONF)
    env = dict(os.environ, LVM_SYSTEM_DIR=str(system), LVM_SUPPRESS_FD_WARNINGS="1")
    with loop_device(disk, start, size) as device:
        def lvm(*arguments: str) -> None:
            subprocess.run([arguments[0], "--devices", device, *arguments[1:]], env=env,
                           check=True, capture_output=True)
        lvm("pvcreate", "-ff", "-y", device)
        lvm("vgcreate", "-s", f"{EXTENT // MiB}m", group, device)
        text_file = scratch / f"{group}.vg"
        lvm("vgcfgbackup", "-f", str(text_file), group)
        text = text_file.read_text()
        closing = text.rstrip().rindex("}")
        text_file.write_text(text[:closing] + _volumes_text(volumes) + text[closing:])
        lvm("vgcfgrestore", "-f", str(text_file), group)
