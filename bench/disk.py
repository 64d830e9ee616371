"""Build a realistic test disk image file, and change it a little afterwards.

Layout (dos label):
  first MiB     MBR and zeros, like the gap a partitioner leaves
  p1 (~85%)     ext4, ~45% used by real files from /usr; most of its free space
                holds the contents of deleted files, as on a disk in use for years
  p2 (~10%)     Linux swap: mkswap header, the rest random noise (incompressible)
  tail (rest)   unpartitioned; stale blocks of other files interleaved with zero runs

The live files and the stale data come from disjoint trees, so the stale
region cannot deduplicate against the filesystem. Every byte of the image is
written (no holes), as on a real disk, so no tool can shortcut through
SEEK_DATA. File choice, deletions, noise and stale layout follow the seed;
only ext4 timestamps vary between builds.
"""

import argparse
import base64
import errno
import itertools
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from bench.system import (
    LINUX_TYPE,
    SECTOR,
    SWAP_TYPE,
    GiB,
    MiB,
    exit_cleanly_on_signals,
    mounted,
    mounted_partition,
    read_partitions,
    run,
    size_argument,
)
from imaging.base.tools import loop_device

BLOCK = 4096
ZEROS = bytes(4 * MiB)

FILESYSTEM_SOURCES = [
    Path("/usr/lib/python3"), Path("/usr/lib/python3.11"), Path("/usr/bin"), Path("/usr/share"),
    Path("/usr/include"), Path("/usr/lib/gcc"), Path("/usr/libexec"), Path("/usr/lib/jvm"),
    Path("/usr/sbin"),
]
STALE_SOURCES = [
    Path("/usr/share/locale"), Path("/usr/share/man"), Path("/usr/lib/x86_64-linux-gnu"),
]
# Lists of registry package names kept for the machine's users, not OS content.
NOT_OS_CONTENT = [Path("/usr/share/package-lists")]

FILESYSTEM_USED_FRACTION = 0.45
# Share of copied files that are later deleted: about half the copies, so that
# deleted data fills most of the free space by the time 45% is live.
DELETED_FILE_SHARE = 0.50
HEADROOM_FRACTION = 0.05
STALE_DATA_FRACTION = 0.60
TRASH_SUFFIX = ".bench-deleted"


def _regular_files(root: Path, excluded: list[Path]) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if Path(directory, d) not in excluded)
        for name in sorted(names):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                yield path


def _filesystem_pool() -> list[Path]:
    files = []
    for root in FILESYSTEM_SOURCES:
        files.extend(_regular_files(root, excluded=STALE_SOURCES + NOT_OS_CONTENT))
    return files


def _layout(size: int) -> tuple[int, int, int, int]:
    """(p1 offset, p1 size, p2 offset, p2 size), MiB-aligned like fdisk does."""
    p1_offset = MiB
    p1_size = int(size * 0.85) // MiB * MiB
    p2_offset = p1_offset + p1_size
    p2_size = int(size * 0.10) // MiB * MiB
    return p1_offset, p1_size, p2_offset, p2_size


def _write_zeros(out, count: int) -> None:
    while count:
        step = min(count, len(ZEROS))
        out.write(ZEROS[:step])
        count -= step


def _write_noise(out, count: int, rng: random.Random) -> None:
    while count:
        step = min(count, 4 * MiB)
        out.write(rng.randbytes(step))
        count -= step


def write_stale(out, count: int, rng: random.Random) -> None:
    """Block-aligned pieces of other files, with zero runs between them, the way
    a previous filesystem's leftovers look after a repartition."""
    files = [f for root in STALE_SOURCES for f in _regular_files(root, excluded=[])]
    rng.shuffle(files)
    sources = iter(files)
    written = data_written = 0
    while written < count:
        source = next(sources, None) if data_written <= STALE_DATA_FRACTION * written else None
        if source is None:
            piece = bytes(BLOCK * rng.randint(1, 512))
        else:
            piece = _block_aligned_excerpt(source.read_bytes(), rng)
            data_written += len(piece)
        piece = piece[:count - written]
        out.write(piece)
        written += len(piece)


def _block_aligned_excerpt(content: bytes, rng: random.Random, limit: int = 8 * MiB) -> bytes:
    if len(content) > limit:
        start = rng.randrange(len(content) - limit) // BLOCK * BLOCK
        content = content[start:start + limit]
    return content + bytes(-len(content) % BLOCK)


def fill_filesystem(root: Path, rng: random.Random) -> None:
    """Copy files until ~45% of the filesystem is live. A seeded share of them
    get names that are deleted later, so deleted content ends up interleaved
    with live files in the free space."""
    target_live_blocks = int(os.statvfs(root).f_blocks * FILESYSTEM_USED_FRACTION)
    pool = _filesystem_pool()
    trash = _Trash()
    for round_number in itertools.count():
        # Only disks larger than the source trees need another round; those
        # copies deduplicate, which flatters every deduplicating tool alike.
        prefix = root / (f"copy{round_number}" if round_number else "")
        copied = 0
        for source in pool:
            stats = os.statvfs(root)
            if stats.f_blocks - stats.f_bfree - trash.blocks >= target_live_blocks:
                trash.empty()
                return
            blocks = -(-source.stat().st_size // stats.f_frsize)
            if stats.f_bfree - blocks < stats.f_blocks * HEADROOM_FRACTION:
                # Full: delete what is doomed so far, like a cleanup would,
                # and let later files overwrite part of it.
                trash.empty()
                stats = os.statvfs(root)
                if stats.f_bfree - blocks < stats.f_blocks * HEADROOM_FRACTION:
                    continue
            destination = prefix / source.relative_to("/")
            doomed = rng.random() < DELETED_FILE_SHARE
            if doomed:
                destination = destination.with_name(destination.name + TRASH_SUFFIX)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, destination)
            except OSError as error:
                # Btrfs' statvfs counts space its metadata will take as free.
                if error.errno != errno.ENOSPC:
                    raise
                destination.unlink(missing_ok=True)
                trash.empty()
                continue
            copied += 1
            if doomed:
                trash.add(destination, blocks)
        if not copied:
            raise RuntimeError("no source file fits in the filesystem any more")


class _Trash:
    """Copied files destined for deletion, and the blocks they hold."""

    def __init__(self):
        self.paths: list[Path] = []
        self.blocks = 0

    def add(self, path: Path, blocks: int) -> None:
        self.paths.append(path)
        self.blocks += blocks

    def empty(self) -> None:
        # Written back first: deleting a file whose delayed allocation never
        # happened would leave nothing behind in the free space.
        os.sync()
        for path in self.paths:
            path.unlink()
        self.paths.clear()
        self.blocks = 0


def build_disk(path: Path, size: int = GiB, seed: int = 1) -> None:
    rng = random.Random(seed)
    disk_id = f"0x{rng.getrandbits(32):08x}"
    fs_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    swap_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    p1_offset, p1_size, p2_offset, p2_size = _layout(size)
    tail_offset = p2_offset + p2_size

    with open(path, "wb") as out:
        _write_zeros(out, p2_offset)
        _write_noise(out, p2_size, rng)
        write_stale(out, size - tail_offset, rng)

    script = (
        f"label: dos\nlabel-id: {disk_id}\n"
        f"start={p1_offset // SECTOR}, size={p1_size // SECTOR}, type={LINUX_TYPE}, bootable\n"
        f"start={p2_offset // SECTOR}, size={p2_size // SECTOR}, type={SWAP_TYPE}\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script)

    with loop_device(path, p2_offset, p2_size) as device:
        run(["mkswap", "--label", "swap", "--uuid", swap_uuid, device])
    with loop_device(path, p1_offset, p1_size) as device:
        # nodiscard: discarding would punch holes in the image file, and a
        # sparse image is not what a real disk looks like.
        run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", fs_uuid,
             "-E", f"nodiscard,lazy_itable_init=0,lazy_journal_init=0,hash_seed={fs_uuid}",
             device])
        with mounted(device) as root:
            fill_filesystem(root, rng)


def change_files(disk: Path, nbytes: int = 16 * MiB, seed: int = 2) -> None:
    """Rewrite and add ~nbytes of files in the ext4 partition: half as new versions
    of existing files (saved the way editors do: new file, rename over the old
    one), half as brand-new files whose content exists nowhere on the disk."""
    rng = random.Random(seed)
    with mounted_partition(disk, LINUX_TYPE) as root:
        candidates = [
            p for p in _regular_files(root, excluded=[root / "lost+found"])
            if 32 * 1024 <= p.stat().st_size <= 2 * MiB
        ]
        rng.shuffle(candidates)
        rewritten = 0
        for path in candidates:
            if rewritten >= nbytes // 2:
                break
            content = bytearray(path.read_bytes())
            # One edit per block, so every block of the file really differs.
            for block_start in range(0, len(content), BLOCK):
                position = block_start + rng.randrange(min(BLOCK, len(content) - block_start))
                content[position] ^= 0xFF
            replacement = path.with_name(path.name + ".new")
            replacement.write_bytes(content)
            replacement.replace(path)
            rewritten += len(content)

        added_dir = root / "var" / "log" / "bench-changes"
        added_dir.mkdir(parents=True, exist_ok=True)
        added = 0
        for number in itertools.count():
            if added >= nbytes - rewritten:
                break
            text = base64.encodebytes(rng.randbytes(768 * 1024))
            (added_dir / f"change-{seed}-{number:04d}.log").write_bytes(text)
            added += len(text)


FOOTPRINT_UNITS = (4096, 64 * 1024, MiB, 4 * MiB)


def change_footprint(before: Path, after: Path,
                     granularities: tuple[int, ...] = FOOTPRINT_UNITS) -> dict[int, int]:
    """Bytes that differ between two images, counted in whole units of each
    granularity: what an ideal deduplicator with that chunk size must store."""
    touched: dict[int, set[int]] = {unit: set() for unit in granularities}
    step = max(granularities)
    with open(before, "rb") as old, open(after, "rb") as new:
        for base in itertools.count(0, step):
            old_piece, new_piece = old.read(step), new.read(step)
            if not old_piece and not new_piece:
                break
            if old_piece == new_piece:
                continue
            for offset in range(0, max(len(old_piece), len(new_piece)), BLOCK):
                if old_piece[offset:offset + BLOCK] != new_piece[offset:offset + BLOCK]:
                    for unit in granularities:
                        touched[unit].add((base + offset) // unit)
    return {unit: len(units) * unit for unit, units in touched.items()}


def describe(disk: Path) -> str:
    parts = read_partitions(disk)
    size = disk.stat().st_size
    lines = [f"Test disk: {size / MiB:.0f} MiB, dos label"]
    names = {LINUX_TYPE: "ext4, ~45% used, deleted files in most of its free space",
             SWAP_TYPE: "swap header + random noise"}
    for part in parts:
        lines.append(f"  p{part.number} type {part.type} at {part.offset // MiB} MiB, "
                     f"{part.size / MiB:.0f} MiB: {names.get(part.type, '')}")
    end = parts[-1].offset + parts[-1].size
    lines.append(f"  unpartitioned tail at {end // MiB} MiB, {(size - end) / MiB:.0f} MiB: "
                 "stale file blocks and zero runs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=size_argument, default=GiB, help="e.g. 256M, 1G (default 1G)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--change", action="store_true",
                        help="instead of building, apply change_files to an existing disk")
    args = parser.parse_args()
    exit_cleanly_on_signals()
    start = time.perf_counter()
    if args.change:
        change_files(args.path)
    else:
        build_disk(args.path, args.size, args.seed)
    print(describe(args.path))
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
