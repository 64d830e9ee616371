"""LVM2 physical volumes read by the engine itself, without device-mapper.

A PV carries a label in one of its first four sectors ("LABELONE", then "LVM2 001"), whose
PV header gives the PV's UUID and where its metadata areas lie. A metadata area starts
with a 512-byte header (magic " LVM2 x[5A%r0N*>") whose first raw location points at the
newest copy of the volume group's text metadata inside the area's circular buffer. That
text (LVM's documented format, as `vgcfgbackup` writes it) names the extent size, each
PV's first extent (`pe_start`) and each LV's segments; a segment of type "striped" with
one stripe is linear. An LV whose linear segments all lie on this PV is a list of byte
ranges of it: the engine reads it as it reads a partition, the ranges joined in the LV's
order (one range when the LV was never extended, or extended into the extents after it).
Anything else (striped, thin pools and volumes, snapshots, mirrors and RAID, or segments
on other PVs) is named for what it is and read in full.
"""
from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from typing import Callable, Optional

from ..base.errors import ImagingError

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
SEGMENT_KEY = re.compile(r"segment\d+")
VOLUME_NAME = re.compile(r"^[A-Za-z0-9+_.-]+/[A-Za-z0-9+_.-]+$")
# The metadata text is short (a few KiB for dozens of volumes), and nests a few levels.
MAX_METADATA = 1024 * 1024
MAX_DEPTH = 8
# An LV extended this many times is read in full: a read of it costs a walk of its pieces.
MAX_SEGMENTS = 256
# A raw location's flag: LVM no longer keeps this area's copy up to date.
RAW_LOCN_IGNORED = 1
CRC_INITIAL = 0xF597A6CF
SEGMENT_TYPES = frozenset({"striped", "mirror", "snapshot", "thin-pool", "thin", "cache",
                           "cache-pool", "writecache", "vdo", "vdo-pool", "integrity", "error",
                           "zero"})
Read = Callable[[int, int], bytes]  # (offset within the PV, length) -> bytes


class LvmError(ImagingError):
    """Why a PV's volumes cannot be read."""


@dataclasses.dataclass(frozen=True)
class LogicalVolume:
    name: str  # "vg0/root"
    # (bytes from the PV's start, length) of a linear one, in the LV's order; else empty.
    pieces: tuple[tuple[int, int], ...]
    size: int
    # "linear", "linear in 2 segments", or why it cannot be read from this PV alone
    # ("striped over 2 PVs", "thin volume")
    layout: str

    @property
    def contiguous(self) -> bool:
        """Whether it is one range of the PV, which a loop device can show as it is."""
        return len(self.pieces) == 1

    @property
    def start(self) -> int:
        """Bytes from the PV's start to its first byte; 0 for one that is not linear."""
        return self.pieces[0][0] if self.pieces else 0



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


def place(number: int, volume: Optional[str]) -> str:
    """How messages name partition `number`, or the logical volume `volume` inside it:
    partition 1, volume vg0/root."""
    return f"volume {volume}" if volume else f"partition {number}"


def read_pv(read: Read, size: int) -> PhysicalVolume:
    """The PV whose bytes `read` gives (`size` bytes long); LvmError if it cannot be read, or
    says anything that does not add up (a backup then reads the PV in full)."""
    label = _label(read)
    uuid, metadata_areas = _pv_header(read, label)
    problem = "its PV has no metadata area (its volume group's text is on another PV)"
    for area in metadata_areas:
        try:
            return described(_metadata_text(read, area, size), uuid, size)
        except _Ignored as ignored:
            problem = str(ignored)
    raise LvmError(problem)


class _Ignored(LvmError):
    """A metadata area LVM no longer keeps up to date: another may be."""


def _label(read: Read) -> int:
    head = read(0, LABEL_SECTORS * SECTOR)
    for start in range(0, LABEL_SECTORS * SECTOR, SECTOR):
        if head[start:start + 8] == LABEL_ID and head[start + 24:start + 32] == LABEL_TYPE:
            return start
    raise LvmError("no LVM2 label in its first four sectors")


def _pv_header(read: Read, label: int) -> tuple[str, list[tuple[int, int]]]:
    """(the PV's UUID without dashes, [(offset, size)] of its metadata areas)."""
    (offset,) = struct.unpack_from("<I", read(label + 20, 4))
    if not 32 <= offset <= SECTOR - 40 - 32:
        raise LvmError("its PV header lies outside the label sector")
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


def checksum(data: bytes) -> int:
    """LVM's CRC-32 of `data` (the usual polynomial, its own initial value, no final xor)."""
    return ~zlib.crc32(data, ~CRC_INITIAL & 0xFFFFFFFF) & 0xFFFFFFFF


def _metadata_text(read: Read, area: tuple[int, int], size: int) -> str:
    area_offset, area_size = area
    if area_offset + area_size > size or area_size <= MDA_HEADER_SIZE:
        raise LvmError("its metadata area lies past the PV's end")
    header = read(area_offset, MDA_HEADER_SIZE)
    if header[4:20] != MDA_MAGIC:
        raise LvmError("its metadata area has no LVM2 header")
    if checksum(header[4:]) != struct.unpack_from("<I", header, 0)[0]:
        raise LvmError("its metadata area's header fails its checksum")
    text_offset, text_size, text_checksum, flags = struct.unpack_from("<QQII", header, 40)
    if flags & RAW_LOCN_IGNORED:
        raise _Ignored("its metadata area is set to be ignored")
    if text_size == 0 or text_size > min(MAX_METADATA, area_size - MDA_HEADER_SIZE) \
            or not MDA_HEADER_SIZE <= text_offset < area_size:
        raise LvmError("its metadata area holds no volume group")
    # A circular buffer after the header: the text may wrap to the buffer's start.
    first = min(text_size, area_size - text_offset)
    data = read(area_offset + text_offset, first)
    if first < text_size:
        data += read(area_offset + MDA_HEADER_SIZE, text_size - first)
    if checksum(data) != text_checksum:
        raise LvmError("its volume group's metadata fails its checksum")
    return data.rstrip(b"\0").decode("utf-8", "replace")


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|([\w.+-]+)\s*=|([\w.+-]+)\s*\{|(\})|"((?:[^"\\]|\\.)*)"'
                    r'|(\[)|(\])|(,)|(-?\d{1,20})(?![\d]))')


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
        if name is not None:
            key = name
        elif section is not None:
            if len(stack) > MAX_DEPTH:
                raise LvmError("its metadata nests deeper than LVM's")
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
            if key is None or values is None:
                raise LvmError("a list without a name in the metadata")
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


def described(text: str, uuid: str, size: int) -> PhysicalVolume:
    """The PV whose UUID (without dashes) is `uuid` and which is `size` bytes long, as the
    group's metadata `text` says; LvmError if the text says anything that does not add up."""
    try:
        return _described(parse(text), uuid, size)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, StopIteration):
        raise LvmError("its metadata does not describe this PV as LVM writes it") from None


def _described(metadata: dict, uuid: str, size: int) -> PhysicalVolume:
    groups = [(name, value) for name, value in metadata.items()
              if isinstance(value, dict) and "physical_volumes" in value]
    if len(groups) != 1:
        raise LvmError("its metadata names no volume group")
    group, vg = groups[0]
    extent_size = _count(vg["extent_size"]) * SECTOR
    pvs = vg["physical_volumes"]
    mine = next(name for name, pv in pvs.items()
                if str(pv.get("id", "")).replace("-", "") == uuid)
    data_start, extents = _count(pvs[mine]["pe_start"]) * SECTOR, _count(pvs[mine]["pe_count"])
    if extent_size == 0 or data_start < LABEL_SECTORS * SECTOR \
            or data_start + extents * extent_size > size:
        raise LvmError("its extents, as its metadata places them, do not fit in it")
    lvs = {name: lv for name, lv in (vg.get("logical_volumes") or {}).items()}
    if not all(isinstance(lv, dict) for lv in lvs.values()):
        raise LvmError("its metadata's volumes are not sections")
    inside = _inside_others(lvs)
    volumes, used = [], []
    for name, lv in lvs.items():
        segments = [value for key, value in lv.items() if SEGMENT_KEY.fullmatch(key)]
        placed = [_areas(segment, mine, set(pvs)) for segment in segments]
        areas = [area for found in placed for area in found]
        for first, count in areas:
            if first + count > extents:
                raise LvmError(f"volume {group}/{name} lies past the PV's last extent")
        used += areas
        if areas:
            volumes.append(_volume(f"{group}/{name}", lv, list(zip(segments, placed)),
                                   inside.get(name), data_start, extent_size))
    ordered = sorted(used)
    if any(first < end for (_, end), (first, _) in zip(
            [(f, f + c) for f, c in ordered], ordered[1:])):
        raise LvmError("two of its volumes claim the same extents")
    return PhysicalVolume(group, data_start, extent_size, extents, volumes, used)


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _segment_type(segment: dict) -> str:
    kind = segment["type"]
    if not isinstance(kind, str) or not (kind in SEGMENT_TYPES or kind.startswith("raid")):
        raise LvmError(f"its metadata has a segment of type {kind!r}, which this engine does "
                       "not know")
    return kind


def _areas(segment: object, mine: str, pvs: set[str]) -> list[tuple[int, int]]:
    """(first extent, extents) of each area of `segment` on the PV named `mine`: whatever
    list names PVs (stripes, or a pvmove's mirrors)."""
    if not isinstance(segment, dict):
        raise TypeError(segment)
    kind, count = _segment_type(segment), _count(segment["extent_count"])
    if count == 0:  # LVM never writes one
        raise ValueError(count)
    stripes = _count(segment.get("stripe_count", 1)) if kind == "striped" else 1
    if stripes == 0 or kind == "striped" and (not isinstance(segment["stripes"], list)
                                              or len(segment["stripes"]) != 2 * stripes):
        raise ValueError(stripes)
    found = []
    for value in segment.values():
        if not isinstance(value, list):
            continue
        for position in range(0, len(value) - 1, 2):
            pv, first = value[position], value[position + 1]
            if isinstance(pv, str) and pv in pvs and pv == mine:
                found.append((_count(first), count // stripes))
    return found


def _inside_others(lvs: dict) -> dict[str, str]:
    """{LV name: what it is part of} of the LVs another volume names in its segments (a thin
    pool's data, a RAID image, a mirror leg, a cache's origin, a snapshot's origin or store):
    they hold another volume's blocks, or blocks a snapshot still needs, so their filesystems
    (if blkid finds one) are never mapped."""
    inside = {}
    for name, lv in lvs.items():
        for key, segment in lv.items():
            if not SEGMENT_KEY.fullmatch(key) or not isinstance(segment, dict):
                continue
            for value in segment.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str) and item in lvs and item != name:
                        inside[item] = f"part of {_segment_type(segment)} volume {name}"
    return inside


def _volume(name: str, lv: dict, segments: list[tuple[dict, list[tuple[int, int]]]],
            inside: Optional[str], data_start: int, extent_size: int) -> LogicalVolume:
    """The LV `name` from its segments, each with its areas on this PV."""
    kinds = {_segment_type(segment) for segment, _ in segments}
    size = sum(_count(segment["extent_count"]) for segment, _ in segments) * extent_size
    status = lv.get("status") or []
    if inside is not None or not isinstance(status, list) or "VISIBLE" not in status:
        return LogicalVolume(name, (), size, inside or "a hidden volume")
    if kinds != {"striped"}:
        return LogicalVolume(name, (), size, " and ".join(sorted(kinds)))
    stripes = max(_count(segment.get("stripe_count", 1)) for segment, _ in segments)
    if stripes != 1:
        return LogicalVolume(name, (), size, f"striped over {stripes} PVs")
    if any(len(areas) != 1 for _, areas in segments):
        return LogicalVolume(name, (), size, "on more than one PV")
    if len(segments) > MAX_SEGMENTS:
        return LogicalVolume(name, (), size, f"in {len(segments)} segments, more than "
                             f"{MAX_SEGMENTS}")
    pieces: list[tuple[int, int]] = []
    expected = 0
    for segment, ((first, count),) in sorted(
            segments, key=lambda placed: _count(placed[0]["start_extent"])):
        if _count(segment["start_extent"]) != expected:
            raise LvmError(f"volume {name}'s segments do not follow one another")
        expected += count
        start = data_start + first * extent_size
        if pieces and sum(pieces[-1]) == start:  # extended into the extents right after it
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + count * extent_size)
        else:
            pieces.append((start, count * extent_size))
    return LogicalVolume(name, tuple(pieces), size, "linear" if len(pieces) == 1
                         else f"linear in {len(pieces)} segments")
