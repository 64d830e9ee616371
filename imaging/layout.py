"""Partition tables through util-linux: what `sfdisk --dump` prints, never re-implemented."""
from __future__ import annotations

import json
import subprocess
from typing import Optional

from . import tools
from .errors import SourceError

MBR_SIZE = 512
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
