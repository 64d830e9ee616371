"""File-level restore on the benchmark disk: listing a folder, extracting a 100 MiB file.

A 100 MiB file of random bytes is written into the ext4 partition of a copy of
the disk, and the copy is backed up (raw). Then, each the median of 5 runs:

- listing the partition's root folder from the image, `python -m imaging
  files IMAGE N /`, timed from the command's start: target under 2 s;
- extracting the file with the engine's `extract` (what `python -m imaging
  extract` runs once Python has started: the private mount, finding the file,
  copying it), against `cat FILE > /dev/null` in a restored copy of the disk
  mounted afresh before each run: target at least 0.5 × cat's throughput. The
  page cache is dropped before every timed run of both, unlike elsewhere in
  the benchmark: a warm `cat` runs at memory speed, which no decompression
  matches, and the file someone wants back from last week's image is not in
  memory either. Extract and cat take turns, round by round. The extracted
  file is compared with the original afterwards.

`python -m bench.files DISK [WORKDIR]` runs it alone on a disk from
`python -m bench.disk`.
"""

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.system import LINUX_TYPE, MiB, mounted, partition_of_type
from imaging.backup import backup
from imaging.errors import ImagingError
from imaging.files import extract
from imaging.restore import restore
from imaging.tools import loop_device

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
FILE_SIZE = 100 * MiB
FILE_NAME = "bench-extract.bin"
LIST_TARGET_SECONDS = 2.0
EXTRACT_TARGET_RATIO = 0.5


def _timed(argv: list) -> float:
    """Seconds the command took, from its start."""
    started = time.perf_counter()
    done = subprocess.run([str(part) for part in argv], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))} failed: {done.stderr.strip()}")
    return seconds


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _prepare(pristine: Path, workdir: Path) -> tuple[Path, int, str]:
    """(image, ext4 partition number, SHA-256 of the file) of a copy holding the file."""
    disk = workdir / "disk.img"
    shutil.copyfile(pristine, disk)
    part = partition_of_type(disk, LINUX_TYPE)
    digest = hashlib.sha256()
    with loop_device(disk, part.offset, part.size) as device, mounted(device) as root:
        with open(root / FILE_NAME, "wb") as handle:
            for _ in range(FILE_SIZE // MiB):
                block = os.urandom(MiB)
                digest.update(block)
                handle.write(block)
    image = backup(str(disk), workdir / "store", disk_id="bench").image
    return image, part.number, digest.hexdigest()


def measure(pristine: Path, workdir: Path) -> dict:
    """Median seconds of listing, extracting and cat, and what the extract read.

    Extract and cat take turns, round by round: the VM's host caches its disk
    too, and whichever side ran later would otherwise find it warmer.
    """
    image, number, digest = _prepare(pristine, workdir)
    imaging = [sys.executable, "-m", "imaging"]
    listing = [_timed([*imaging, "files", image, number, "/"]) for _ in range(ROUNDS)]
    restored = workdir / "restored.img"
    restore(str(image), str(restored))
    part = partition_of_type(restored, LINUX_TYPE)
    extracting, catting, chunk_bytes = [], [], 0
    for round_number in range(ROUNDS):
        out = workdir / f"out-{round_number}"
        _drop_caches()
        started = time.perf_counter()
        result = extract(image, number, [f"/{FILE_NAME}"], out)
        extracting.append(time.perf_counter() - started)
        chunk_bytes = result.chunk_bytes_read
        if hashlib.sha256((out / FILE_NAME).read_bytes()).hexdigest() != digest:
            raise RuntimeError("the extracted file differs from the original")
        shutil.rmtree(out)
        with loop_device(restored, part.offset, part.size, read_only=True) as device, \
                mounted(device) as root:
            _drop_caches()
            catting.append(_timed(["sh", "-c", 'cat "$0" > /dev/null', root / FILE_NAME]))
    # Both sides share the machine with whatever else runs: the figure says how much did.
    return {"list": statistics.median(listing), "extract": statistics.median(extracting),
            "cat": statistics.median(catting), "chunk_bytes": chunk_bytes,
            "load": os.getloadavg()[0]}


def report_lines(pristine: Path, workdir: Path) -> list[str]:
    """The benchmark's lines for the report: each figure against its target, or why it failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    listing = ("Files: listing the ext4 root folder from an image (`files`, from the "
               "command's start)")
    extracting = (f"Files: extracting a {FILE_SIZE // MiB} MiB file (the engine's `extract`) "
                  "against `cat` in a restored, mounted copy")
    try:
        figures = measure(pristine, workdir)
    except (ImagingError, OSError, RuntimeError, subprocess.CalledProcessError) as failure:
        return [f"{listing}: FAIL ({failure})", f"{extracting}: FAIL ({failure})"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours, cat = FILE_SIZE / figures["extract"], FILE_SIZE / figures["cat"]
    ratio = ours / cat
    return [
        f"{listing}: {figures['list']:.2f} s, target < {LIST_TARGET_SECONDS:g} s: "
        f"{'PASS' if figures['list'] < LIST_TARGET_SECONDS else 'FAIL'}",
        f"{extracting}: {ours / MiB:.0f} MiB/s against {cat / MiB:.0f} MiB/s, "
        f"ratio {ratio:.3f}, target ≥ {EXTRACT_TARGET_RATIO:g}: "
        f"{'PASS' if ratio >= EXTRACT_TARGET_RATIO else 'FAIL'} "
        f"({figures['chunk_bytes'] / MiB:.0f} MiB of chunks read, "
        f"load average {figures['load']:.1f})",
    ]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.files DISK [WORKDIR]")
    parent = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="files-", dir=parent) as workdir:
        print("\n".join(report_lines(Path(sys.argv[1]), Path(workdir) / "files")))


if __name__ == "__main__":
    main()
