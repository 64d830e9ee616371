"""Used-blocks imaging: ours against the Clonezilla way, on one disk image.

`run(disk_path, workdir)` (workdir: an empty directory) times, with a warm
page cache and a sync inside the timed span (bench.measure.timed):
  - ours, `backup --mode used`;
  - the Clonezilla pipeline, one step after another as Clonezilla runs them:
    `partclone.<fs> -c | zstd -T0 -3` for every partition partclone knows,
    over read-only loop devices; swap as its header page (Clonezilla keeps
    even less: it re-runs mkswap); partclone.dd for partitions without a
    known filesystem; and the MBR, gaps and unpartitioned space raw through
    `zstd -T0 -3`;
  - ours, `backup --mode raw`, for the size ratio.
It returns the targets as rows [criterion, ours, peer, ours/peer, target,
result], the shape of bench.report's targets table.
"""

import contextlib
import operator
import shlex
import sys
from pathlib import Path

from bench.measure import CommandFailed, timed
from bench.system import MiB, attached_loop, read_through, tree_bytes
from imaging import layout, usedmap

REPO_ROOT = Path(__file__).resolve().parent.parent
SWAP_HEADER = 4096
STORE_TARGET = 1.02
THROUGHPUT_TARGET = 1.5
RAW_OVER_USED_TARGET = 2.5


def run(disk_path, workdir) -> list[list[str]]:
    disk, workdir = Path(disk_path), Path(workdir)
    disk_size = disk.stat().st_size
    used = _ours(disk, workdir / "used-store", "used")
    clonezilla = _clonezilla(disk, workdir / "clonezilla")
    raw = _ours(disk, workdir / "raw-store", "raw")

    def rate(seconds: float) -> float:
        return disk_size / MiB / seconds

    return [
        _row("Used-mode store vs Clonezilla (partclone + zstd -T0 -3)",
             ("ours used", used, lambda r: r["bytes"], _size),
             ("Clonezilla", clonezilla, lambda r: r["bytes"], _size),
             STORE_TARGET, operator.le),
        _row("Used-mode throughput vs Clonezilla",
             ("ours used", used, lambda r: rate(r["seconds"]), _rate),
             ("Clonezilla", clonezilla, lambda r: rate(r["seconds"]), _rate),
             THROUGHPUT_TARGET, operator.ge),
        _row("Raw-mode store / used-mode store",
             ("ours raw", raw, lambda r: r["bytes"], _size),
             ("ours used", used, lambda r: r["bytes"], _size),
             RAW_OVER_USED_TARGET, operator.ge),
    ]


def _ours(disk: Path, store: Path, mode: str) -> dict | str:
    """{"seconds", "bytes"} of one backup, or why it failed."""
    argv = [sys.executable, "-m", "imaging", "backup", str(disk), "--store", str(store),
            "--disk", "bench", "--mode", mode, "--json", "--quiet"]
    read_through(disk)
    try:
        timing = timed(argv, cwd=REPO_ROOT)
    except CommandFailed as failure:
        return str(failure)
    return {"seconds": timing.seconds, "bytes": tree_bytes(store / "chunks")}


def _clonezilla(disk: Path, output: Path) -> dict | str:
    output.mkdir(parents=True)
    quoted_disk = shlex.quote(str(disk))
    log = shlex.quote(str(output / "partclone.log"))

    def raw(offset: int, size: int, name: str) -> str:
        return (f"dd if={quoted_disk} iflag=skip_bytes,count_bytes skip={offset} count={size} "
                f"bs=4M status=none | zstd -T0 -3 -q > {shlex.quote(str(output / name))}")

    steps, cursor = [], 0
    with contextlib.ExitStack() as loops:
        devices = []
        for number, entry in enumerate(layout.partitions(str(disk)), start=1):
            start = entry["start"] * entry["sectorsize"]
            size = entry["size"] * entry["sectorsize"]
            if start > cursor:
                steps.append(raw(cursor, start - cursor, f"gap-{cursor}.zst"))
            filesystem = _filesystem(disk, start, size)
            if filesystem == "swap":
                steps.append(raw(start, SWAP_HEADER, f"p{number}.swap-header.zst"))
            else:
                device = loops.enter_context(attached_loop(disk, start, size, read_only=True))
                devices.append(Path(device))
                tool = _partclone_tool(filesystem)
                steps.append(f"partclone.{tool} -c -q -L {log} -s {device} -o - | zstd -T0 -3 -q "
                             f"> {shlex.quote(str(output / f'p{number}.{tool}.pc.zst'))}")
            cursor = max(cursor, start + size)
        if cursor < disk.stat().st_size:
            steps.append(raw(cursor, disk.stat().st_size - cursor, f"gap-{cursor}.zst"))
        for path in [disk, *devices]:
            read_through(path)
        try:
            timing = timed(["bash", "-e", "-o", "pipefail", "-c", "\n".join(steps)])
        except CommandFailed as failure:
            return str(failure)
    (output / "partclone.log").unlink(missing_ok=True)
    return {"seconds": timing.seconds, "bytes": tree_bytes(output)}


def _filesystem(disk: Path, start: int, size: int) -> str | None:
    try:
        return usedmap.probe(str(disk), start, size)[0]
    except usedmap.Unmappable:
        return None


def _partclone_tool(filesystem: str | None) -> str:
    if filesystem in usedmap.EXT_TYPES:
        return filesystem
    return usedmap.PARTCLONE_TOOLS.get(filesystem, "dd")


def _row(criterion: str, ours: tuple, peer: tuple, target: float, better) -> list[str]:
    """ours/peer are (label, measurement or failure reason, value of it, format of value)."""
    cells, values = [], []
    for label, measured, value, show in (ours, peer):
        if isinstance(measured, str):
            return [criterion, "—", "—", "", "", f"n/a ({label}: {measured})"]
        values.append(value(measured))
        cells.append(f"{label}: {show(values[-1])}")
    ratio = values[0] / values[1]
    sign = "≤" if better is operator.le else "≥"
    return [criterion, *cells, f"{ratio:.2f}x", f"{sign} {target:g}x",
            "PASS" if better(ratio, target) else "FAIL"]


def _size(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f} MiB"


def _rate(mib_per_second: float) -> str:
    return f"{mib_per_second:.0f} MiB/s"
