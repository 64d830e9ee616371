"""Small but realistic disk image files, built with the real tools.

A disk gets an MBR ("dos") or GPT partition table written by sfdisk, and each
partition gets real content: ext4 or FAT filesystems holding real files plus
the remains of a deleted file in their free space, swap, random noise, or
nothing. Unpartitioned gaps and the tail after the last partition can hold
random bytes too, since a whole-disk backup must not lose them.

Random content is seeded, so two builds with the same seed give the same noise
(filesystem metadata still carries timestamps).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .devices import loop_device, mounted, run

SECTOR = 512
MiB = 1024 * 1024
# Where sfdisk would put the first partition by default; keeps partitions aligned.
FIRST_PARTITION_START = 1 * MiB
# The backup GPT (32 sectors of entries + 1 header sector) sits at the very end.
GPT_BACKUP_SIZE = 33 * SECTOR
# mtools derives the FAT type from the cluster count, so FAT32 needs 65525+
# clusters; with 512-byte clusters that is a bit over 32 MiB.
FAT32_MIN_SIZE = 33 * MiB
# Each 4 KiB block of a deleted file starts with this, so tests can find it.
DELETED_FILE_MARKER = b"imaging-test deleted file residue\n"
DELETED_BLOCK_SIZE = 4096

KINDS = ("ext4", "fat32", "fat16", "swap", "raw-noise", "empty")

_DOS_TYPES = {"ext4": "83", "fat32": "c", "fat16": "e", "swap": "82", "raw-noise": "83", "empty": "83"}
_GPT_LINUX_FILESYSTEM = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
_GPT_LINUX_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
_GPT_MICROSOFT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
_GPT_TYPES = {
    "ext4": _GPT_LINUX_FILESYSTEM,
    "fat32": _GPT_MICROSOFT_BASIC_DATA,
    "fat16": _GPT_MICROSOFT_BASIC_DATA,
    "swap": _GPT_LINUX_SWAP,
    "raw-noise": _GPT_LINUX_FILESYSTEM,
    "empty": _GPT_LINUX_FILESYSTEM,
}


@dataclass(frozen=True)
class PartSpec:
    """What build_disk should put in one partition.

    gap_before: unpartitioned bytes, filled with random data, left between the
    previous partition (or the 1 MiB table area) and this one.
    """

    size: int
    kind: str
    gap_before: int = 0


@dataclass(frozen=True)
class Part:
    number: int
    start: int
    size: int
    fstype: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Disk:
    """A built image. Offsets and sizes are in bytes.

    unpartitioned_data: (start, size) ranges outside every partition that hold
    random bytes (gaps and tail).
    """

    path: Path
    size: int
    label: str
    partitions: list[Part]
    unpartitioned_data: list[tuple[int, int]] = field(default_factory=list)


def build_disk(
    path: str | os.PathLike,
    size: int,
    label: str = "dos",
    partitions: list[PartSpec] | tuple[PartSpec, ...] = (),
    seed: int = 0,
    tail_noise: bool = True,
) -> Disk:
    """Create the image file `path` of `size` bytes and fill it.

    Partitions are laid out in order from 1 MiB on. With tail_noise, the space
    after the last partition (up to the backup GPT for "gpt") gets random bytes.
    """
    path = Path(path)
    if label not in ("dos", "gpt"):
        raise ValueError(f"label must be 'dos' or 'gpt', not {label!r}")
    if size % SECTOR:
        raise ValueError(f"disk size must be a multiple of {SECTOR}")
    if label == "dos" and len(partitions) > 4:
        raise ValueError("a dos label holds at most 4 (primary) partitions")
    usable_end = size - GPT_BACKUP_SIZE if label == "gpt" else size
    parts, gaps = _lay_out(partitions, usable_end)
    if tail_noise and parts and parts[-1].end < usable_end:
        gaps.append((parts[-1].end, usable_end - parts[-1].end))

    with open(path, "wb") as image:
        image.truncate(size)
    rng = random.Random(f"{seed}:disk")
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", path,
        input=_sfdisk_script(label, parts, rng).encode())
    for start, gap_size in gaps:
        _write_noise(path, start, gap_size, random.Random(f"{seed}:gap:{start}"))
    for part in parts:
        _fill_partition(path, part, random.Random(f"{seed}:part:{part.number}"))
    return Disk(path=path, size=size, label=label, partitions=parts, unpartitioned_data=gaps)


def _lay_out(specs, usable_end: int) -> tuple[list[Part], list[tuple[int, int]]]:
    parts: list[Part] = []
    gaps: list[tuple[int, int]] = []
    cursor = FIRST_PARTITION_START
    for number, spec in enumerate(specs, start=1):
        if spec.kind not in KINDS:
            raise ValueError(f"unknown partition kind {spec.kind!r}; expected one of {KINDS}")
        if spec.size % SECTOR or spec.gap_before % SECTOR:
            raise ValueError(f"partition {number}: size and gap must be multiples of {SECTOR}")
        if spec.kind == "fat32" and spec.size < FAT32_MIN_SIZE:
            raise ValueError(f"partition {number}: fat32 needs at least {FAT32_MIN_SIZE} bytes; use fat16")
        if spec.gap_before:
            gaps.append((cursor, spec.gap_before))
        part = Part(number, cursor + spec.gap_before, spec.size, spec.kind)
        if part.end > usable_end:
            raise ValueError(f"partition {number} ends at {part.end}, past the usable end {usable_end}")
        parts.append(part)
        cursor = part.end
    return parts, gaps


def _sfdisk_script(label: str, parts: list[Part], rng: random.Random) -> str:
    if label == "dos":
        lines = ["label: dos", f"label-id: 0x{rng.getrandbits(32):08x}"]
        lines += [
            f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={_DOS_TYPES[p.fstype]}"
            for p in parts
        ]
    else:
        lines = ["label: gpt", f"label-id: {_seeded_uuid(rng)}"]
        lines += [
            f"start={p.start // SECTOR}, size={p.size // SECTOR}, "
            f"type={_GPT_TYPES[p.fstype]}, uuid={_seeded_uuid(rng)}"
            for p in parts
        ]
    return "\n".join(lines) + "\n"


def _seeded_uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _write_noise(path: Path, start: int, size: int, rng: random.Random) -> None:
    with open(path, "r+b") as image:
        image.seek(start)
        for chunk_start in range(0, size, MiB):
            image.write(rng.randbytes(min(MiB, size - chunk_start)))


def _fill_partition(path: Path, part: Part, rng: random.Random) -> None:
    if part.fstype == "ext4":
        _fill_ext4(path, part, rng)
    elif part.fstype in ("fat32", "fat16"):
        _fill_fat(path, part, rng)
    elif part.fstype == "swap":
        _fill_swap(path, part, rng)
    elif part.fstype == "raw-noise":
        _write_noise(path, part.start, part.size, rng)


def _fill_ext4(path: Path, part: Part, rng: random.Random) -> None:
    with loop_device(path, part.start, part.size) as device:
        # Eager inode table and journal init: no lazyinit thread writing behind our back.
        run("mkfs.ext4", "-q", "-F", "-U", _seeded_uuid(rng), "-L", f"part{part.number}",
            "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", device)
        with tempfile.TemporaryDirectory(prefix="mnt-", dir=path.parent) as mountpoint, \
                mounted(device, mountpoint) as root:
            for source, relative in _pick_real_files(part.size // 4, rng):
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            deleted = root / "deleted.bin"
            _write_deleted_file_content(deleted, part.size // 8, rng)
            deleted.unlink()


def _fill_fat(path: Path, part: Part, rng: random.Random) -> None:
    fat_bits = "32" if part.fstype == "fat32" else "16"
    start_sector = part.start // SECTOR
    # Hidden sectors = partition start, as a partitioning tool would record it.
    run("mkfs.vfat", "-F", fat_bits, "-s", "1", "-S", str(SECTOR), "--invariant",
        "-i", f"{rng.getrandbits(32):08x}", "-n", f"PART{part.number}",
        f"--offset={start_sector}", "-h", str(start_sector), path, str(part.size // 1024))
    image = f"{path}@@{part.start}"
    with tempfile.TemporaryDirectory(prefix="fat-", dir=path.parent) as staging:
        staging = Path(staging)
        for source, relative in _pick_real_files(part.size // 4, rng):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staging / relative)
        _write_deleted_file_content(staging / "deleted.bin", part.size // 8, rng)
        # -D o: overwrite instead of asking when two names clash case-insensitively.
        _mtools("mcopy", "-i", image, "-s", "-m", "-D", "o",
                *sorted(staging.iterdir()), "::/")
    _mtools("mdel", "-i", image, "::/deleted.bin")


def _mtools(*command) -> None:
    # mtools otherwise refuses images whose geometry does not look like a floppy or disk.
    run("env", "MTOOLS_SKIP_CHECK=1", *command)


def _fill_swap(path: Path, part: Part, rng: random.Random) -> None:
    # Noise first: mkswap then writes only the header page over it, like a used swap.
    _write_noise(path, part.start, part.size, rng)
    with loop_device(path, part.start, part.size) as device:
        run("mkswap", "-U", _seeded_uuid(rng), "-L", f"part{part.number}", device)


def make_luks(path: Path, part: Part, scratch: Path) -> None:
    """Encrypt partition `part` of the disk at `path` as LUKS2 (passphrase "passphrase"):
    cryptsetup's header written over its first 2 MiB."""
    header = scratch / f"luks-{part.number}.img"
    with open(header, "wb") as file:
        file.truncate(part.size)
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--luks2-metadata-size",
        "16k", "--luks2-keyslots-size", "1m", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", header, input=b"passphrase")
    with open(path, "r+b") as image:
        image.seek(part.start)
        image.write(header.read_bytes()[:2 * MiB])
    header.unlink()


def _write_deleted_file_content(path: Path, size: int, rng: random.Random) -> None:
    block_noise = DELETED_BLOCK_SIZE - len(DELETED_FILE_MARKER)
    with open(path, "wb") as file:
        for _ in range(max(size // DELETED_BLOCK_SIZE, 1)):
            file.write(DELETED_FILE_MARKER + rng.randbytes(block_noise))
        # On disk before the unlink; otherwise delayed allocation never writes it.
        file.flush()
        os.fsync(file.fileno())


def _pick_real_files(budget: int, rng: random.Random) -> list[tuple[Path, Path]]:
    """A seeded random choice of Python stdlib files adding up to about `budget` bytes.

    Returns (source, path relative to the stdlib) pairs in sorted order.
    """
    candidates = list(_stdlib_files())
    rng.shuffle(candidates)
    picked, total = [], 0
    for source, relative, size in candidates:
        if total + size > budget:
            continue
        picked.append((source, relative))
        total += size
    return sorted(picked)


@functools.cache
def _stdlib_files() -> tuple[tuple[Path, Path, int], ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(stdlib):
        subdirectories[:] = sorted(d for d in subdirectories
                                   if d not in ("__pycache__", "site-packages"))
        for name in sorted(names):
            source = Path(directory, name)
            if name.endswith(".py") and not source.is_symlink():
                files.append((source, source.relative_to(stdlib), source.stat().st_size))
    return tuple(files)
