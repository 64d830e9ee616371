"""LVM2 physical volumes read by the engine itself, without device-mapper.

A PV carries a label in one of its first four sectors ("LABELONE", then "LVM2 001"), whose
PV header gives the PV's UUID and where its metadata areas lie. A metadata area starts
with a 512-byte header (magic " LVM2 x[5A%r0N*>") whose first raw location points at the
newest copy of the volume group's text metadata inside the area's circular buffer. That
text (LVM's documented format, as `vgcfgbackup` writes it) names the extent size, each
PV's first extent (`pe_start`) and each LV's segments; a segment of type "striped" with
one stripe is linear. An LV whose one linear segment lies on this PV is a contiguous
byte range of it: the engine reads it as it reads a partition. Anything else (striped,
thin pools and volumes, snapshots, mirrors and RAID, or segments on other PVs) is named
for what it is and read in full.
"""
from __future__ import annotations

import dataclasses
import re
import struct
from typing import Callable, Optional

from ..base.errors import ImagingError

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
VOLUME_NAME = re.compile(r"^[A-Za-z0-9+_.-]+/[A-Za-z0-9+_.-]+$")
# The metadata text is short; anything larger is not what LVM writes.
MAX_METADATA = 16 * 1024 * 1024
Read = Callable[[int, int], bytes]  # (offset within the PV, length) -> bytes


class LvmError(ImagingError):
    """Why a PV's volumes cannot be read."""


@dataclasses.dataclass(frozen=True)
class LogicalVolume:
    name: str  # "vg0/root"
    start: int  # bytes from the PV's start, for a contiguous one
    size: int
    layout: str  # "linear", or why it is read in full ("striped over 2 PVs", "thin volume")

    @property
    def contiguous(self) -> bool:
        return self.layout == "linear"



@dataclasses.dataclass(frozen=True)
class PhysicalVolume:
    group: str
    data_start: int  # bytes from the PV's start to its first extent
    extent_size: int  # bytes
    extents: int  # this PV's extents
    volumes: list[LogicalVolume]  # every LV with an extent on this PV
    used_extents: list[tuple[int, int]]  # (first extent, count) of this PV allocated to LVs

    def free(self) -> list[tuple[int, int]]:
        """(offset, length) in bytes from the PV's start of its extents no LV holds."""
        ranges, cursor = [], 0
        for first, count in sorted(self.used_extents):
            if first > cursor:
                ranges.append((cursor, first - cursor))
            cursor = max(cursor, first + count)
        if cursor < self.extents:
            ranges.append((cursor, self.extents - cursor))
        return [(self.data_start + first * self.extent_size, count * self.extent_size)
                for first, count in ranges]


def file_name(name: str) -> str:
    """How a file names the LV `name` ("vg0/root"): vg0-root, as /dev/mapper does, dashes
    within either name doubled."""
    group, _, volume = name.partition("/")
    return f"{group.replace('-', '--')}-{volume.replace('-', '--')}"


def is_pv(head: bytes) -> bool:
    """Whether the first LABEL_SECTORS sectors `head` hold an LVM2 label."""
    return any(head[sector * SECTOR:sector * SECTOR + 8] == LABEL_ID
               and head[sector * SECTOR + 24:sector * SECTOR + 32] == LABEL_TYPE
               for sector in range(LABEL_SECTORS))


def read_pv(read: Read, size: int) -> PhysicalVolume:
    """The PV whose bytes `read` gives (`size` bytes long); LvmError if it cannot be read."""
    label = _label(read)
    uuid, metadata_areas = _pv_header(read, label)
    if not metadata_areas:
        raise LvmError("its PV has no metadata area (its volume group's text is on another PV)")
    text = _metadata_text(read, metadata_areas[0], size)
    return _volume_group(parse(text), uuid)


def _label(read: Read) -> int:
    for sector in range(LABEL_SECTORS):
        head = read(sector * SECTOR, 32)
        if head[:8] == LABEL_ID and head[24:32] == LABEL_TYPE:
            return sector * SECTOR
    raise LvmError("no LVM2 label in its first four sectors")


def _pv_header(read: Read, label: int) -> tuple[str, list[tuple[int, int]]]:
    """(the PV's UUID without dashes, [(offset, size)] of its metadata areas)."""
    (offset,) = struct.unpack_from("<I", read(label + 20, 4))
    header = read(label + offset, SECTOR - offset)
    uuid = header[:32].decode("ascii", "replace")
    areas: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas
    position, which = 40, 0
    while which < 2:
        if position + 16 > len(header):
            raise LvmError("its PV header's area lists run past the label sector")
        area_offset, area_size = struct.unpack_from("<QQ", header, position)
        position += 16
        if area_offset == 0:
            which += 1
            continue
        areas[which].append((area_offset, area_size))
    return uuid, areas[1]


def _metadata_text(read: Read, area: tuple[int, int], size: int) -> str:
    area_offset, area_size = area
    if area_offset + area_size > size or area_size <= MDA_HEADER_SIZE:
        raise LvmError("its metadata area lies past the PV's end")
    header = read(area_offset, MDA_HEADER_SIZE)
    if header[4:20] != MDA_MAGIC:
        raise LvmError("its metadata area has no LVM2 header")
    text_offset, text_size = struct.unpack_from("<QQ", header, 40)
    if text_size == 0 or text_size > MAX_METADATA or text_offset >= area_size:
        raise LvmError("its metadata area holds no volume group")
    # A circular buffer after the header: the text may wrap to the buffer's start.
    first = min(text_size, area_size - text_offset)
    data = read(area_offset + text_offset, first)
    if first < text_size:
        data += read(area_offset + MDA_HEADER_SIZE, text_size - first)
    return data.rstrip(b"\0").decode("utf-8", "replace")


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|([\w.+-]+)\s*=|([\w.+-]+)\s*\{|(\})|"((?:[^"\\]|\\.)*)"'
                    r'|(\[)|(\])|(,)|(-?\d+))')


def parse(text: str) -> dict:
    """LVM's text metadata as nested dicts: sections, numbers, strings and lists."""
    root: dict = {}
    stack = [root]
    key: Optional[str] = None
    values: Optional[list] = None
    position = 0
    while position < len(text):
        found = _TOKEN.match(text, position)
        if found is None:
            if text[position:].strip():
                raise LvmError(f"unreadable metadata near {text[position:position + 20]!r}")
            break
        position = found.end()
        name, section, close, string, opening, closing, _, number = found.groups()
        if found.group(0).strip().startswith("#") or found.group(7):
            continue
        if name is not None:
            key = name
        elif section is not None:
            child: dict = {}
            stack[-1][section] = child
            stack.append(child)
        elif close is not None:
            if len(stack) == 1:
                raise LvmError("unbalanced } in the metadata")
            stack.pop()
        elif opening is not None:
            values = []
        elif closing is not None:
            stack[-1][key] = values
            values, key = None, None
        elif string is not None or number is not None:
            value = string if string is not None else int(number)
            if values is not None:
                values.append(value)
            elif key is not None:
                stack[-1][key] = value
                key = None
    return root


def _volume_group(metadata: dict, uuid: str) -> PhysicalVolume:
    groups = [(name, value) for name, value in metadata.items()
              if isinstance(value, dict) and "physical_volumes" in value]
    if len(groups) != 1:
        raise LvmError("its metadata names no volume group")
    group, vg = groups[0]
    try:
        extent_size = int(vg["extent_size"]) * SECTOR
        pvs = vg["physical_volumes"]
        mine = next(name for name, pv in pvs.items()
                    if str(pv.get("id", "")).replace("-", "") == uuid)
        pv = pvs[mine]
        data_start, extents = int(pv["pe_start"]) * SECTOR, int(pv["pe_count"])
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        raise LvmError("its metadata does not describe this PV") from None
    volumes, used = [], []
    for name, lv in (vg.get("logical_volumes") or {}).items():
        if not isinstance(lv, dict):
            continue
        segments = [value for key, value in lv.items()
                    if key.startswith("segment") and isinstance(value, dict)]
        here = [(segment, stripe) for segment in segments
                for stripe in _stripes_on(segment, mine)]
        if not here:
            continue
        for segment, first in here:
            count = int(segment.get("extent_count", 0)) // max(int(segment.get(
                "stripe_count", 1)), 1)
            used.append((first, count))
        volumes.append(_volume(f"{group}/{name}", lv, segments, here, data_start, extent_size,
                               len(pvs)))
    return PhysicalVolume(group, data_start, extent_size, extents, volumes, used)


def _stripes_on(segment: dict, pv: str) -> list[int]:
    """The first extent of each stripe of `segment` on the PV named `pv` there."""
    stripes = segment.get("stripes") or []
    return [int(stripes[i + 1]) for i in range(0, len(stripes) - 1, 2) if stripes[i] == pv]


def _volume(name: str, lv: dict, segments: list[dict], here: list[tuple[dict, int]],
            data_start: int, extent_size: int, pv_count: int) -> LogicalVolume:
    kinds = {str(segment.get("type", "")) for segment in segments}
    size = sum(int(segment.get("extent_count", 0)) for segment in segments) * extent_size
    if kinds - {"striped"}:
        named = {"thin-pool": "thin pool", "thin": "thin volume", "snapshot": "snapshot",
                 "mirror": "mirror", "raid1": "RAID1", "cache": "cached volume"}
        kind = next(iter(sorted(kinds - {"striped"})))
        return LogicalVolume(name, 0, size, named.get(kind, kind))
    if len(segments) != 1 or len(here) != 1:
        return LogicalVolume(name, 0, size, f"{len(segments)} segments" if len(segments) > 1
                             else f"on {pv_count} PVs")
    segment, first = here[0]
    if int(segment.get("stripe_count", 1)) != 1:
        return LogicalVolume(name, 0, size, f"striped over {segment['stripe_count']} PVs")
    return LogicalVolume(name, data_start + first * extent_size, size, "linear")
