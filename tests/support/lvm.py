"""LVM2 test disks: the benchmark's builder (bench.lvm), which needs lvm2's tools."""
import os
from pathlib import Path

from bench import lvm
from bench.lvm import EXTENT, PE_START, Volume
from support.requirements import requirement_missing

__all__ = ["EXTENT", "PE_START", "Volume", "make_physical_volume"]


def make_physical_volume(disk: Path, start: int, size: int, group: str,
                         volumes: list[Volume], scratch: Path) -> None:
    for tool in lvm.TOOLS:
        if not os.access(f"/usr/sbin/{tool}", os.X_OK):
            requirement_missing(f"{tool} is missing: install lvm2")
    lvm.make_physical_volume(disk, start, size, group, volumes, scratch)
