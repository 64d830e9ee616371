"""`make run`: the engine's real job on a demo disk, start to finish.

Builds a realistic demo disk (an ext4 partition full of files, swap, stale
data), backs it up with a live progress bar, changes some files and backs it
up again (only the changes are stored), shows the image history, then
restores the first image and proves the result byte-identical.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.disk import build_disk, change_files
from bench.system import MiB

DATA_DIR = Path(os.environ.get("DATA_DIR", "data"))
DEMO_SIZE = 512 * MiB


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def imaging(*args: object) -> str:
    """Run the real CLI with the terminal attached, so its progress bar shows."""
    command = [sys.executable, "-m", "imaging", *map(str, args)]
    print("$ " + shlex.join(["python", "-m", "imaging", *map(str, args)]), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    demo = DATA_DIR / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    disk = demo / "disk.img"
    store = Path(os.environ.get("IMAGING_DATASTORE", DATA_DIR / "datastore"))
    if not disk.exists():
        step(f"Building a {DEMO_SIZE // MiB} MiB demo disk: ext4 full of files, swap, stale data")
        started = time.monotonic()
        partial = disk.with_name("disk.img.partial")
        build_disk(partial, DEMO_SIZE)
        partial.replace(disk)
        print(f"built {disk} in {time.monotonic() - started:.1f} s")

    step("The disk's partition table, as sfdisk --dump prints it")
    imaging("layout", disk)

    step("Backup: every sector, deduplicated, zstd-compressed")
    first = imaging("backup", disk, "--store", store, "--disk", "demo-disk")
    original = sha256_of(disk)

    step("Change 16 MiB of files on the disk, then back it up again")
    change_files(disk, 16 * MiB, seed=int(time.time()))
    imaging("backup", disk, "--store", store, "--disk", "demo-disk")

    step("Image history of the disk")
    imaging("list", "--store", store, "--disk", "demo-disk")

    step("Verify the first image: re-hash every chunk it needs")
    imaging("verify", first)

    step("Restore the first image to a new disk file, reading it back to compare")
    restored = demo / "restored.img"
    restored.unlink(missing_ok=True)
    imaging("restore", first, restored)
    same = sha256_of(restored) == original
    print(f"sha256 of the restored disk {'equals' if same else 'DIFFERS FROM'} the disk as it was backed up")
    print(f"\nDatastore: {store}  (try: python -m imaging list --store {store})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
