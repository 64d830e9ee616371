"""Partition tables through util-linux: what `sfdisk --dump` prints, never re-implemented."""
from __future__ import annotations

import json
import subprocess
from typing import Optional

from .errors import SourceError

MBR_SIZE = 512


def dump(source: str) -> Optional[str]:
    """`sfdisk --dump SOURCE` output, or None when the source has no partition table."""
    try:
        result = subprocess.run(["sfdisk", "--dump", source], capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceError("sfdisk not found: install util-linux's fdisk package") from None
    if result.returncode == 0:
        return result.stdout
    message = result.stderr.strip()
    if "does not contain a recognized partition table" in message:
        return None
    raise SourceError(f"cannot read the partition table of {source}: "
                      f"{message.splitlines()[-1] if message else 'sfdisk failed'}")


def partitions(source: str) -> list[dict]:
    """Partitions as sfdisk's JSON lists them (start and size in sectors), empty if none."""
    result = subprocess.run(["sfdisk", "--json", source], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    table = json.loads(result.stdout)["partitiontable"]
    return [dict(p, sectorsize=table.get("sectorsize", 512), label=table.get("label"))
            for p in table.get("partitions", [])]
