"""Build the demo disk unless it exists:  python -m demo PATH

A 512 MiB disk-image file built by bench/disk.py: a dos label, an ext4
partition holding real files (and deleted ones in its free space), a swap
partition and an unpartitioned tail of stale data, like a disk in use for
years. It boots (BIOS) into a tiny Linux that shows a login prompt
(bench/bootable.py), so a boot test of its images has something to prove. It
is written to PATH.partial and renamed when complete, so an interrupted build
leaves no demo disk that looks finished. Needs root: the filesystem is made and
filled through loop devices.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.bootable import make_bios_bootable
from bench.disk import build_disk
from bench.system import MiB, exit_cleanly_on_signals

DEMO_DISK_SIZE = 512 * MiB


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="e.g. data/demo/demo-disk.img")
    disk = parser.parse_args().path
    if disk.exists():
        print(f"demo disk: {disk} (exists)")
        return 0
    if os.geteuid() != 0:
        print("python -m demo: building the demo disk needs root (loop devices and mounts)",
              file=sys.stderr)
        return 1
    exit_cleanly_on_signals()
    disk.parent.mkdir(parents=True, exist_ok=True)
    partial = disk.with_name(disk.name + ".partial")
    print(f"building the {DEMO_DISK_SIZE // MiB} MiB demo disk {disk} "
          "(ext4 full of files, swap, stale data; it boots)...", flush=True)
    started = time.monotonic()
    try:
        build_disk(partial, DEMO_DISK_SIZE)
        make_bios_bootable(partial, 1)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(disk)
    print(f"demo disk: {disk} (built in {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
