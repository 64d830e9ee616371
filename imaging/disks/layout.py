"""Partition tables through util-linux: what `sfdisk --dump` prints, never re-implemented,
kept in an image as layout.sf, and read back from there."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Optional

from ..base import tools
from ..base.errors import SourceError

MBR_SIZE = 512
# An image's copy of its disk's first sector.
MBR_NAME = "mbr.bin"
# An image's copy of `sfdisk --dump` of its disk.
LAYOUT_NAME = "layout.sf"
# How a used-mode manifest says a partition was read in full: "full: <why>".
FULL_PREFIX = "full: "
_DUMP_FIELD = re.compile(r'(\w+)=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
# Debian's name for the util-linux package that ships sfdisk.
SFDISK_PACKAGE = "fdisk"


def _sfdisk(*arguments: str) -> subprocess.CompletedProcess:
    return tools.run("sfdisk", SFDISK_PACKAGE, arguments, kind=SourceError, text=True)


def dump(source: str) -> Optional[str]:
    """`sfdisk --dump SOURCE` output, or None when the source has no partition table."""
    result = _sfdisk("--dump", source)
    if result.returncode == 0:
        return result.stdout
    if "does not contain a recognized partition table" in result.stderr:
        return None
    raise SourceError(f"cannot read the partition table of {source}: {tools.complaint(result)}")


def partitions(source: str) -> list[dict]:
    """Partitions as sfdisk's JSON lists them (start and size in sectors), empty if none."""
    result = _sfdisk("--json", source)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    try:
        table = json.loads(result.stdout)["partitiontable"]
        entries = [dict(p, sectorsize=int(table.get("sectorsize", 512)), label=table.get("label"))
                   for p in table.get("partitions", [])]
        for entry in entries:
            if not all(isinstance(entry.get(key), int) for key in ("start", "size")):
                raise ValueError(f"a partition without start and size: {entry}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"cannot read the partition table of {source}: unexpected JSON "
                          f"from sfdisk ({exc})") from None
    return entries


def parse_dump(text: str, sector_size: int = 512, probed: list[dict] = ()) -> list[dict]:
    """Partitions of an `sfdisk --dump` text; `probed`: a used-mode manifest's partition notes,
    whose filesystems, why one was stored in full ("stored_in_full") and an LVM PV's
    logical volumes ("volumes") are matched by start."""
    filesystems = {note["start"]: note.get("filesystem") for note in probed}
    in_full = {note["start"]: str(note["mapped"]).removeprefix(FULL_PREFIX) for note in probed
               if str(note.get("mapped", "")).startswith(FULL_PREFIX)}
    # An LVM2 PV's logical volumes that can be read as volumes, by name (a manifest older
    # than "linear" marks them by a start).
    volumes = {note["start"]: [{"name": volume["name"], "size": volume.get("size") or 0,
                                "fstype": volume.get("filesystem")}
                               for volume in note.get("volumes") or ()
                               if isinstance(volume, dict)
                               and (volume.get("linear") or volume.get("start"))
                               and isinstance(volume.get("name"), str)]
               for note in probed if isinstance(note.get("volumes"), list)}
    found = []
    for line in text.splitlines():
        header, _, value = line.partition(":")
        if header == "sector-size" and value.strip().isdigit():
            sector_size = int(value)
            continue
        node, separator, fields = line.partition(" : ")
        if not separator:
            continue
        values = {key: value.strip('"') for key, value in _DUMP_FIELD.findall(fields)}
        if not values.get("start", "").isdigit() or not values.get("size", "").isdigit():
            continue
        start = int(values["start"]) * sector_size
        found.append({"name": Path(node.strip()).name, "start": start,
                      "size": int(values["size"]) * sector_size, "type": values.get("type"),
                      "fstype": filesystems.get(start), "label": values.get("name") or None,
                      **({"stored_in_full": in_full[start]} if start in in_full else {}),
                      **({"volumes": volumes[start]} if volumes.get(start) else {})})
    return found
