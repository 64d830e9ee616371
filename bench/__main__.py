"""Benchmark our imaging engine against borg, zstd, dd|gzip, 7za and partclone.

Builds a test disk, then for each round: runs every selected peer on a fresh
copy of it, changes 16 MiB of files, runs the re-backups and restores. Two
sections compare several runs: "used" (our used-blocks backup against
Clonezilla's partclone | zstd, bench/used_peers.py) and, in the first round
only, "export" (our `export --level 19 --long` against recompressing to 7z,
bench/export_peers.py; off by default, ~11 min on 1 GiB: add it with --peers,
or use --peers all). Then a disk of other layouts (LVM, XFS, Btrfs;
bench/layouts.py), boot tests (bench/boot.py) and the web section
(bench/web.py): the same backup through the API and a worker against the CLI,
live progress over WebSockets, and the JSON API over a catalog of 10,000 images.
Prints a markdown report of the medians, also written to bench/results.md.
"""

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import boot, catalog, export_peers, files, history, layouts, used_peers, web
from bench.disk import build_disk, change_files, change_footprint, describe
from bench.peers import PEERS as TOOL_PEERS
from bench.peers import Bench, Peer, Run, median, merge_rounds
from bench.report import (
    BUSY_MACHINE_SHARE,
    Results,
    disturbed,
    runs_table,
    targets_table,
)
from bench.system import GiB, MiB, exit_cleanly_on_signals, size_argument

REPO_ROOT = Path(__file__).resolve().parent.parent
# In running order: the used section reuses the partclone peer's run when it
# has one, the export section exports the image of ours' first backup.
PEERS = [*TOOL_PEERS, used_peers.PEER, export_peers.PEER]
VERSION_COMMANDS = {
    "borg": ["borg", "--version"],
    "zstd": ["zstd", "--version"],
    "gzip": ["gzip", "--version"],
    "7za": ["7za"],
    "partclone.ext4": ["partclone.ext4", "--version"],
}


SECTION_NOTES = {
    "used": "Used mode: our `backup --mode used` against the Clonezilla pipeline (the partclone "
            "run: partclone.<fs> | zstd -T0 -3 per partition, swap header and gaps raw "
            "through zstd), and our `backup --mode raw` of the same disk against it; after the "
            "change, our used-mode re-backup into the same store against the raw re-backup of "
            "the ours peer.",
    "export": "Export: our `export --level 19 --long` of the first backup's image against the "
              "classic `gunzip -c d.gz | 7za a -si d.7z` (LZMA2, level 5), timed from a `gzip -9` "
              "archive of the disk made beforehand (untimed); decompression `zstd -dc` against "
              f"`7za x -so`, both to /dev/null, each the median of {export_peers.DECODE_ROUNDS} "
              "runs in a row. The export is decompressed and compared with the disk afterwards "
              "(untimed).",
}


def _sample_size(text: str) -> int:
    """A size, or 0: the whole disk."""
    return 0 if text.strip() == "0" else size_argument(text)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", type=size_argument, default=GiB,
                        help="test disk size, e.g. 256M for a quick try (default 1G)")
    parser.add_argument("--disk", type=Path,
                        help="use a copy of this disk image (from python -m bench.disk) "
                             "instead of building one")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "data" / "bench",
                        help="a temporary directory is made and removed inside it "
                             "(default data/bench)")
    parser.add_argument("--peers", default=",".join(peer.name for peer in PEERS if peer.default),
                        help="comma-separated names among: "
                             f"{', '.join(peer.name for peer in PEERS)}, or 'all' "
                             "(default: %(default)s; 7za adds ~4 min on 1 GiB, export ~11 min)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="repeat the fast peers this many times, report medians (default 5)")
    parser.add_argument("--gzip-sample", type=_sample_size, default=256 * MiB,
                        help="time dd|gzip -9 on this much of the disk and scale up; "
                             "0 = whole disk (default 256M)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="on a shared machine, let each measurement wait up to SECONDS for "
                             "other work to stop (default 0: don't wait)")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    known = {peer.name for peer in PEERS}
    args.peers = sorted(known) if args.peers == "all" else args.peers.split(",")
    unknown = set(args.peers) - known
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {sorted(known)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _tool_versions() -> list[str]:
    lines = []
    for tool, argv in VERSION_COMMANDS.items():
        if shutil.which(argv[0]) is None:
            continue
        result = subprocess.run(argv, capture_output=True, text=True)
        text = (result.stdout + result.stderr).strip().splitlines()
        lines.append(f"{tool}: {next((line for line in text if line.strip()), '?').strip()}")
    return lines


def _run_round(number: int, peers: list[Peer], pristine: Path, workdir: Path,
               args: argparse.Namespace) -> tuple[dict[str, Run], dict[int, int]]:
    """All peers on a fresh copy of the disk; returns their runs and what the change touched."""
    round_dir = workdir / f"round-{number}"
    round_dir.mkdir()
    disk = round_dir / "disk.img"
    shutil.copyfile(pristine, disk)
    bench = Bench(disk=disk, workdir=round_dir, repo_root=REPO_ROOT, gzip_sample=args.gzip_sample,
                  idle_wait=args.wait_idle)
    for peer in peers:
        _progress(f"round {number}: {peer.name} on the original disk")
        peer.on_original(bench)
    _progress(f"round {number}: changing 16 MiB of files")
    change_files(disk)
    footprint = change_footprint(pristine, disk)
    for peer in peers:
        if peer.on_changed:
            _progress(f"round {number}: {peer.name} on the changed disk")
            peer.on_changed(bench)
    if not args.keep:
        shutil.rmtree(round_dir)
    return bench.runs, footprint


def _footprint(footprints: list[dict[int, int]]) -> str:
    """What the change touched, per unit: the median over rounds and their range."""
    parts = []
    for unit in footprints[0]:
        changed = [footprint[unit] for footprint in footprints]
        text = f"{median(changed) / MiB:.1f} MiB"
        if min(changed) != max(changed):
            text += f" ({min(changed) / MiB:.1f}–{max(changed) / MiB:.1f})"
        parts.append(f"{text} in {unit // 1024} KiB units")
    return ", ".join(parts)


def _report(results: Results, pristine: Path, build_seconds: float,
            footprints: list[dict[int, int]], rounds: int, notes: list[str],
            catalog_line: str) -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    lines = [
        f"# Benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"Machine: {os.cpu_count()} CPUs, {memory_gib:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}.",
        "",
        "```",
        describe(pristine),
        f"built in {build_seconds:.1f} s",
        "16 MiB of files changed before the re-backups marked so; the disk blocks that changed "
        f"(median of the rounds, and their range): {_footprint(footprints)}",
        "```",
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
        catalog_line,
        "",
        "## All runs",
        "",
        runs_table(results),
        "",
        "## Method",
        "",
        f"- Each run was measured in {rounds} rounds, each on a fresh copy of the disk with fresh "
        "stores, except runs marked as measured once. Wall time, output size and new bytes are "
        "each the median of the rounds (ext4 places the changed files differently each time); "
        "the range of wall times is in brackets, CPU figures come from the median-time round, "
        "and peak memory is the highest of any round."
        if rounds > 1 else "- One round: each figure is a single measurement.",
        "- Ratios are ours / the peer's, to three decimals; a figure scaled up from part of the "
        "disk says so where it appears.",
        "- Throughput is disk size / wall seconds, for backups and restores alike.",
        "- The page cache is warm for everybody: each run's inputs (the disk, or the store/archive "
        "being restored) are read once right before it is timed; caches are never dropped.",
        "- Dirty pages are flushed before each run and a `sync` ends each timed span, so output "
        "durability costs the same for tools that fsync (borg) and tools that don't.",
        "- Peak memory is the larger of the biggest single process's max RSS (/usr/bin/time %M) "
        "and the summed PSS of the whole process tree sampled every 50 ms.",
        "- Restores write a fresh file and are compared byte for byte with the disk (a partition's "
        "restore with that partition) afterwards (untimed). Ours restores the image taken after "
        "the change; zstd restores the original.",
        "- borg runs with `--files-cache=disabled`: with a disk *file*, its files cache would skip "
        "the unchanged re-backup on a stat() alone, a shortcut a real block device never offers.",
        "- Ours and the peers' outputs are all sized as the sum of their regular files' sizes "
        "(ours: the store's chunks/); `du -sb` would add 1 MiB for our 256 chunk folders.",
        "- Other CPU s: what the machine spent on anything else during the run (/proc/stat "
        "minus the run's own CPU; includes writeback and this benchmark's memory sampler). "
        f"⚠ marks runs where that exceeded {BUSY_MACHINE_SHARE:.0%} of one CPU: their wall "
        "times are inflated by other work.",
    ]
    if any(disturbed(run) for run in results.runs.values() if not run.error):
        lines.append("- **The machine was busy during runs marked ⚠: the ratios between tools "
                     "that use every core (ours, zstd -T0) and single-threaded ones (borg, gzip) "
                     "are skewed. Rerun on an idle machine (or with --wait-idle) before trusting "
                     "them.**")
    lines += [f"- {note}" for note in notes]
    lines += ["", "Tools:", ""] + [f"- {line}" for line in _tool_versions()] + [""]
    return "\n".join(lines)


def main() -> None:
    args = _arguments()
    exit_cleanly_on_signals()
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    notes = [f"Load average when the run started: {os.getloadavg()[0]:.2f}."]
    try:
        pristine = workdir / "pristine.img"
        build_start = time.perf_counter()
        if args.disk:
            _progress(f"copying {args.disk}")
            shutil.copyfile(args.disk, pristine)
        else:
            _progress(f"building a {args.size / MiB:.0f} MiB test disk")
            build_disk(pristine, args.size)
        build_seconds = time.perf_counter() - build_start
        selected = []
        for peer in (peer for peer in PEERS if peer.name in args.peers):
            missing = peer.missing_tools()
            if missing:
                notes.append(f"Not run: {peer.name} ({', '.join(missing)} not installed).")
            else:
                selected.append(peer)
        rounds, footprints = [], []
        for number in range(1, args.rounds + 1):
            peers = selected if number == 1 else [peer for peer in selected if peer.repeat]
            runs, footprint = _run_round(number, peers, pristine, workdir, args)
            rounds.append(runs)
            footprints.append(footprint)
        once = [peer.name for peer in selected if not peer.repeat]
        if args.rounds > 1 and once:
            notes.append(f"Measured once, in the first round: {', '.join(once)} (slow, or "
                         "sections of several runs).")
        notes += [SECTION_NOTES[peer.name] for peer in selected if peer.name in SECTION_NOTES]
        _progress(f"listing {catalog.IMAGES:,} images through the catalog")
        catalog_line = catalog.report_line(workdir / "catalog")
        _progress("listing and extracting files from an image of the disk")
        catalog_line = "\n\n".join([catalog_line, *files.report_lines(pristine, workdir / "files")])
        _progress("an LVM, XFS and Btrfs disk: used mode against Clonezilla, listing files")
        catalog_line = "\n\n".join([catalog_line, *layouts.report_lines(workdir / "layouts")])
        _progress("boot tests: imaging boot against plain qemu on a restored copy")
        catalog_line = "\n\n".join([catalog_line, *boot.report_lines(workdir / "boot")])
        _progress(f"{history.NIGHTS} nights of changes, backed up by every tool each night")
        catalog_line = "\n\n".join([catalog_line, *history.report_lines(
            pristine, workdir / "history", progress=_progress)])
        web_section = web.section(pristine, workdir / "web",
                                  web.Scale(rounds=min(args.rounds, web.ROUNDS)),
                                  idle_wait=args.wait_idle, progress=_progress)
        notes += web_section.notes
        notes.append(f"Whole run: {(time.perf_counter() - start) / 60:.1f} min.")
        results = Results(merge_rounds(rounds) | web_section.runs, pristine.stat().st_size,
                          web_section.rows)
        report = _report(results, pristine, build_seconds, footprints, args.rounds, notes,
                         catalog_line)
    finally:
        if args.keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir)
    print(report)
    args.results.write_text(report)
    _progress(f"written to {args.results}")


if __name__ == "__main__":
    main()
