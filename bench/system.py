"""Thin wrappers around the system tools the benchmark relies on.

Loop devices and mounts are global kernel state that outlives this process,
so every helper that creates one is a context manager that undoes it even
when the body raises or the run is interrupted.
"""

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging.base.errors import ImagingError
from imaging.base.tools import loop_device, parse_size

SECTOR = 512
MiB = 1 << 20
GiB = 1 << 30

LINUX_TYPE = "83"
SWAP_TYPE = "82"


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a helper command, failing loudly with its stderr in the message."""
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def command_seconds(argv: list, cwd: Path | None = None) -> float:
    """Seconds the command took, from its start; RuntimeError with its stderr if it failed."""
    started = time.perf_counter()
    done = subprocess.run([str(part) for part in argv], capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))} failed: {done.stderr.strip()}")
    return seconds


def measured(lines: list[str], tools: list[str], workdir: Path,
             measure: Callable[[Path], dict]) -> tuple[dict | None, list[str]]:
    """(measure(workdir)'s figures, []), or (None, each of `lines` with why it has none: a
    tool missing, or the failure); workdir is removed either way."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return None, [f"{line}: not run ({', '.join(missing)} not installed)" for line in lines]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return measure(workdir), []
    except (ImagingError, OSError, RuntimeError, ValueError, KeyError,
            subprocess.CalledProcessError) as failure:
        return None, [f"{line}: FAIL ({failure})" for line in lines]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_alone(name: str, lines: Callable[[Path], list[str]], parent: str | None) -> None:
    """Print one section's lines for the report, measured in a temporary folder of its own
    (inside `parent`, made if missing), as `python -m bench.<section>` does."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=parent) as workdir:
        print("\n".join(lines(Path(workdir) / name)))


def size_argument(text: str) -> int:
    """A size on the command line, as the engine reads it ('256M', '1G', '2GB');
    argparse shows an ArgumentTypeError's words, and only those."""
    try:
        return parse_size(text)
    except ImagingError as refused:
        raise argparse.ArgumentTypeError(str(refused)) from None


def exit_cleanly_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so `finally` blocks detach loop
    devices and unmount (SIGINT already raises KeyboardInterrupt)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int
    size: int
    type: str


def read_partitions(disk: Path) -> list[Partition]:
    table = json.loads(run(["sfdisk", "--json", str(disk)]).stdout)["partitiontable"]
    return [
        Partition(number=index + 1, offset=entry["start"] * SECTOR, size=entry["size"] * SECTOR,
                  type=entry["type"])
        for index, entry in enumerate(table["partitions"])
    ]


def partition_of_type(disk: Path, type_code: str) -> Partition:
    return next(p for p in read_partitions(disk) if p.type == type_code)


@contextlib.contextmanager
def mounted(device: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-mnt-") as mountpoint:
        run(["mount", device, mountpoint])
        try:
            yield Path(mountpoint)
        finally:
            run(["umount", mountpoint])


@contextlib.contextmanager
def mounted_partition(disk: Path, type_code: str) -> Iterator[Path]:
    part = partition_of_type(disk, type_code)
    # The kernel here does not create partition nodes: a partition is a loop device of its own.
    with loop_device(disk, part.offset, part.size) as device, mounted(device) as root:
        yield root


def tree_bytes(path: Path) -> int:
    """The bytes of every regular file under `path`: what a store holds.

    Not `du -sb`, which adds each directory's size as the filesystem reports
    it (4 KiB apiece on ext4, other figures elsewhere) to files' apparent
    sizes: 1 MiB for a datastore's 256 chunk folders, whatever it holds.
    """
    return sum(entry.stat().st_size for entry in path.rglob("*")
               if entry.is_file() and not entry.is_symlink())


def read_through(path: Path) -> None:
    """Read every byte once so the page cache holds it for the timed run."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    buffer = bytearray(16 * MiB)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def same_content(a: Path, b: Path, offset: int = 0, length: int | None = None) -> bool:
    """Whether `a` holds exactly b's bytes, or the `length` of them from `offset`."""
    if length is None:
        return subprocess.run(["cmp", "--silent", str(a), str(b)]).returncode == 0
    return a.stat().st_size == length and subprocess.run(
        ["cmp", "--silent", f"--ignore-initial=0:{offset}", f"--bytes={length}", str(a), str(b)]
    ).returncode == 0
