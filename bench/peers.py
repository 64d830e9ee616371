"""The tools measured side by side, as a list of named peers.

A peer is a name, the tools it needs, and up to two steps: one run on the
freshly built disk, one after `change_files` has modified it. Each step
records its measurements in `bench.runs` under keys like "borg.first"; the
report picks the keys it compares. To add a peer, write its step functions
and append a `Peer` to `PEERS`. Sections with a module of their own
(bench/used_peers.py, bench/export_peers.py) define their `PEER` there, and
bench/__main__.py appends them. The helpers they share (`Bench.measure`, the
one way to run and time a command; `pipeline`, `imaging_command`,
`ours_backup`) live here.
"""

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import CommandFailed, timed, wait_until_idle
from bench.system import (
    LINUX_TYPE,
    MiB,
    partition_of_type,
    read_through,
    run,
    same_content,
    tree_bytes,
)
from imaging.base.tools import loop_device
from imaging.datastore import keys
from imaging.disks import layout, lvm, usedmap


@dataclass
class Run:
    label: str
    seconds: float | None = None
    output_bytes: int | None = None
    peak_memory: int | None = None
    cpu_seconds: float | None = None
    other_cpu_seconds: float | None = None
    new_bytes: int | None = None
    identical: bool | None = None
    note: str = ""
    error: str | None = None
    stdout: str = field(default="", repr=False)
    image: Path | None = None
    # Fastest and slowest wall seconds over the rounds, when there were several.
    spread: tuple[float, float] | None = None
    # How its figures were scaled up from a part of the disk; empty when measured whole.
    extrapolated: str = ""
    # The bytes it reads or writes when only part of the disk (one partition), else None.
    size: int | None = None


@dataclass
class Bench:
    disk: Path
    workdir: Path
    repo_root: Path
    gzip_sample: int
    # Seconds each measurement may wait for other work on the machine to stop.
    idle_wait: float = 0.0
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def disk_size(self) -> int:
        return self.disk.stat().st_size

    def path(self, name: str) -> Path:
        return self.workdir / name

    def measure(self, key: str, label: str, argv: list[str], *, inputs: list[Path],
                **timed_options) -> Run:
        """Time argv after reading its inputs into the page cache, and record it."""
        wait_until_idle(self.idle_wait)
        for path in inputs:
            read_through(path)
        try:
            timing = timed(argv, **timed_options)
        except CommandFailed as failure:
            return self.fail(key, label, str(failure))
        self.runs[key] = Run(label, seconds=timing.seconds, peak_memory=timing.peak_memory,
                             cpu_seconds=timing.cpu_seconds,
                             other_cpu_seconds=timing.other_cpu_seconds, stdout=timing.stdout)
        return self.runs[key]

    def fail(self, key: str, label: str, reason: str) -> Run:
        self.runs[key] = Run(label, error=reason)
        return self.runs[key]


def merge_rounds(rounds: list[dict[str, Run]]) -> dict[str, Run]:
    """One Run per key: the median wall time (its round's CPU figures and
    note stand for all), the fastest and slowest as its spread, the highest
    peak memory of any round, and the median output size and new bytes (ext4
    places the changed files a little differently each round, and a tool's
    output with them). An error or a mismatching restore in any round wins."""
    merged = {}
    for key, first in rounds[0].items():
        runs = [round_runs[key] for round_runs in rounds if key in round_runs]
        failed = next((run for run in runs if run.error), None)
        if failed or len(runs) == 1:
            merged[key] = failed or first
            continue
        by_time = sorted(runs, key=lambda run: run.seconds)
        middle = by_time[(len(by_time) - 1) // 2]
        merged[key] = Run(
            first.label, seconds=middle.seconds,
            output_bytes=median([run.output_bytes for run in runs if run.output_bytes is not None]),
            peak_memory=max(run.peak_memory for run in runs),
            cpu_seconds=middle.cpu_seconds, other_cpu_seconds=middle.other_cpu_seconds,
            new_bytes=median([run.new_bytes for run in runs if run.new_bytes is not None]),
            identical=None if first.identical is None else all(run.identical for run in runs),
            note=middle.note, spread=(by_time[0].seconds, by_time[-1].seconds),
            extrapolated=first.extrapolated, size=first.size)
    return merged


def median(values: list[int]) -> int | None:
    """The middle value (the lower of the two middle ones for an even count)."""
    return sorted(values)[(len(values) - 1) // 2] if values else None


def pipeline(script: str) -> list[str]:
    """argv running a shell script that fails as soon as any command or pipe stage fails."""
    return ["bash", "-e", "-o", "pipefail", "-c", script]


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def imaging_command(*args: str) -> list[str]:
    """argv running our engine's CLI (with cwd=the repository root)."""
    return [sys.executable, "-m", "imaging", *args]


def ours_backup(bench: Bench, key: str, label: str, store: Path, *options: str) -> Run:
    """Time `imaging backup` of the disk into store and record its figures:
    store size (chunks/), new bytes, the image it made."""
    result = bench.measure(
        key, label, imaging_command("backup", str(bench.disk), "--store", str(store),
                                    "--disk", "bench", "--json", *options),
        inputs=[bench.disk], cwd=bench.repo_root)
    if result.error:
        return result
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return bench.fail(key, label, "backup --json printed no JSON on its last line")
    result.output_bytes = tree_bytes(store / "chunks")
    result.new_bytes = report["new_bytes"]
    result.image = Path(report["image"])
    result.note = f"engine says {report['seconds']:.2f} s, bad_bytes {report['bad_bytes']}"
    return result


# --- ours -------------------------------------------------------------------

OURS_BACKUPS = {"ours.first": "ours: first backup",
                "ours.unchanged": "ours: re-backup, unchanged disk",
                "ours.changed": "ours: re-backup after 16 MiB change"}
# key: (label, options, whether the ext4 partition alone is restored)
OURS_RESTORES = {
    "ours.restore": ("ours: restore --no-verify", ["--no-verify"], False),
    "ours.restore_verified": ("ours: restore (verified)", [], False),
    "ours.restore_partition": ("ours: restore --partition (ext4) --no-verify", ["--no-verify"],
                               True),
    "ours.restore_partition_verified": ("ours: restore --partition (ext4, verified)", [], True),
}


def _engine_problem(bench: Bench) -> str | None:
    probe = subprocess.run(imaging_command("--help"), cwd=bench.repo_root, capture_output=True,
                           text=True)
    if probe.returncode == 0:
        return None
    last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return f"engine unavailable ({last_line})"


def _ours_backup(bench: Bench, key: str) -> None:
    ours_backup(bench, key, OURS_BACKUPS[key], bench.path("ours-store"))


def _fail_ours(bench: Bench, keys: list[str], reason: str) -> None:
    labels = OURS_BACKUPS | {key: label for key, (label, *_) in OURS_RESTORES.items()}
    for key in keys:
        bench.fail(key, labels[key], reason)


def ours_on_original(bench: Bench) -> None:
    problem = _engine_problem(bench)
    if problem:
        _fail_ours(bench, [*OURS_BACKUPS, *OURS_RESTORES], problem)
        return
    _ours_backup(bench, "ours.first")
    if bench.runs["ours.first"].error:
        _fail_ours(bench, ["ours.unchanged"], "first backup failed")
    else:
        _ours_backup(bench, "ours.unchanged")


def ours_on_changed(bench: Bench) -> None:
    if "ours.changed" in bench.runs:  # already marked failed: the engine is unavailable
        return
    if bench.runs["ours.first"].error:
        _fail_ours(bench, ["ours.changed", *OURS_RESTORES], "first backup failed")
        return
    _ours_backup(bench, "ours.changed")
    changed = bench.runs["ours.changed"]
    if changed.error:
        _fail_ours(bench, list(OURS_RESTORES), "no image to restore")
        return
    part = partition_of_type(bench.disk, LINUX_TYPE)
    for key, (label, options, partition_alone) in OURS_RESTORES.items():
        target = _fresh(bench.path("ours-restored.img"))
        if partition_alone:
            options = [*options, "--partition", str(part.number)]
        result = bench.measure(
            key, label, imaging_command("restore", str(changed.image), str(target), *options),
            inputs=[bench.path("ours-store")], cwd=bench.repo_root)
        if not result.error:
            if partition_alone:
                result.size = part.size
                result.note = f"partition {part.number}, {part.size // MiB} MiB: MiB/s of its bytes"
                result.identical = same_content(target, bench.disk, part.offset, part.size)
            else:
                result.identical = same_content(target, bench.disk)
        target.unlink(missing_ok=True)


# --- ours, encrypted ----------------------------------------------------------

ENCRYPTED_RUNS = {"encrypted.first": "ours, encrypted: first backup",
                  "encrypted.changed": "ours, encrypted: re-backup after 16 MiB change",
                  "encrypted.restore": "ours, encrypted: restore --no-verify"}


def _key_file(bench: Bench) -> Path:
    """A key of the round's own, made untimed (no passphrase: scrypt is not the measure)."""
    path = bench.path("bench.key")
    if not path.exists():
        keys.create(path)
    return path


def encrypted_on_original(bench: Bench) -> None:
    problem = _engine_problem(bench)
    if problem:
        for key, label in ENCRYPTED_RUNS.items():
            bench.fail(key, label, problem)
        return
    ours_backup(bench, "encrypted.first", ENCRYPTED_RUNS["encrypted.first"],
                bench.path("encrypted-store"), "--key", str(_key_file(bench)))


def encrypted_on_changed(bench: Bench) -> None:
    if "encrypted.changed" in bench.runs:
        return
    failed = bench.runs["encrypted.first"].error and "first backup failed"
    changed = None if failed else ours_backup(
        bench, "encrypted.changed", ENCRYPTED_RUNS["encrypted.changed"],
        bench.path("encrypted-store"), "--key", str(_key_file(bench)))
    if failed or changed.error:
        for key in ("encrypted.changed", "encrypted.restore")[0 if failed else 1:]:
            bench.fail(key, ENCRYPTED_RUNS[key], failed or "no image to restore")
        return
    target = _fresh(bench.path("encrypted-restored.img"))
    result = bench.measure(
        "encrypted.restore", ENCRYPTED_RUNS["encrypted.restore"],
        imaging_command("restore", str(changed.image), str(target), "--no-verify",
                        "--key", str(_key_file(bench))),
        inputs=[bench.path("encrypted-store")], cwd=bench.repo_root)
    if not result.error:
        result.identical = same_content(target, bench.disk)
    target.unlink(missing_ok=True)


# --- borg -------------------------------------------------------------------

def _borg_env(bench: Bench) -> dict[str, str]:
    return os.environ | {
        "BORG_BASE_DIR": str(bench.path("borg-base")),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        "BORG_PASSPHRASE": "",
    }


def _borg_create(bench: Bench, key: str, label: str, archive: str) -> None:
    repo = bench.path("borg-repo")
    size_before = tree_bytes(repo)
    # A disk file's stat() would let borg's files cache skip an unchanged
    # re-backup without reading it; a real block device gives borg no such
    # shortcut, so the cache is off to measure what a disk backup costs.
    result = bench.measure(
        key, label, ["borg", "create", "--compression", "zstd,3", "--read-special",
                     "--files-cache=disabled", f"{repo}::{archive}", str(bench.disk)],
        inputs=[bench.disk], env=_borg_env(bench))
    if not result.error:
        result.output_bytes = tree_bytes(repo)
        result.new_bytes = result.output_bytes - size_before


def borg_on_original(bench: Bench) -> None:
    run(["borg", "init", "-e", "none", str(bench.path("borg-repo"))], env=_borg_env(bench))
    _borg_create(bench, "borg.first", "borg: first backup", "a")
    _borg_create(bench, "borg.unchanged", "borg: re-backup, unchanged disk", "b")


def borg_on_changed(bench: Bench) -> None:
    _borg_create(bench, "borg.changed", "borg: re-backup after 16 MiB change", "c")


# --- zstd -------------------------------------------------------------------

def zstd_on_original(bench: Bench) -> None:
    compressed = bench.path("disk.zst")
    result = bench.measure("zstd.compress", "zstd -T0 -3",
                           ["zstd", "-T0", "-3", "-c", str(bench.disk)],
                           inputs=[bench.disk], stdout=compressed)
    if result.error:
        return
    result.output_bytes = compressed.stat().st_size
    target = _fresh(bench.path("zstd-restored.img"))
    restored = bench.measure(
        "zstd.restore", "zstd -dc | dd bs=4M",
        pipeline(f"zstd -dc {shlex.quote(str(compressed))} "
                 f"| dd of={shlex.quote(str(target))} bs=4M"),
        inputs=[compressed])
    if not restored.error:
        restored.identical = same_content(target, bench.disk)
    target.unlink()


# --- dd | gzip -9 -----------------------------------------------------------

GZIP_SLICES = 16


def gzip_on_original(bench: Bench) -> None:
    """The classic HOWTO pipeline. It runs at a few MiB/s, so by default it is
    timed on evenly spaced slices of the disk (every region in proportion,
    unlike a prefix, which would be all filesystem) and scaled up."""
    disk = shlex.quote(str(bench.disk))
    output = bench.path("disk.gz")
    kib = 1024
    if bench.gzip_sample and bench.gzip_sample < bench.disk_size:
        slice_kib = bench.gzip_sample // GZIP_SLICES // kib
        stride_kib = bench.disk_size // GZIP_SLICES // kib
        reads = "; ".join(
            f"dd if={disk} bs=1024 skip={index * stride_kib} count={slice_kib} conv=noerror,sync"
            for index in range(GZIP_SLICES))
        script = f"{{ {reads}; }} | gzip -9 > {shlex.quote(str(output))}"
        sampled = slice_kib * kib * GZIP_SLICES
    else:
        script = f"dd if={disk} bs=1024 conv=noerror,sync | gzip -9 > {shlex.quote(str(output))}"
        sampled = bench.disk_size
    result = bench.measure("gzip.compress", "dd bs=1024 conv=noerror,sync | gzip -9",
                           pipeline(script), inputs=[bench.disk])
    if result.error:
        return
    scale = bench.disk_size / sampled
    result.output_bytes = round(output.stat().st_size * scale)
    result.seconds *= scale
    result.cpu_seconds *= scale
    result.other_cpu_seconds *= scale
    if scale != 1:
        result.extrapolated = (f"extrapolated from {sampled // MiB} MiB in {GZIP_SLICES} "
                               "slices")
        result.note = (f"measured on {sampled // MiB} MiB in {GZIP_SLICES} evenly spaced slices, "
                       f"time and size scaled x{scale:.2f}")


# --- 7-Zip ------------------------------------------------------------------

def sevenzip_on_original(bench: Bench) -> None:
    archive = bench.path("disk.7z")
    result = bench.measure("7za.compress", "7za a -si (LZMA2, level 5)",
                           ["7za", "a", "-si", str(archive)], inputs=[bench.disk], stdin=bench.disk)
    if result.error:
        return
    result.output_bytes = archive.stat().st_size
    bench.measure("7za.extract", "7za x -so > /dev/null", ["7za", "x", "-so", str(archive)],
                  inputs=[archive], stdout=Path(os.devnull))


# --- partclone: used blocks, the Clonezilla way ---------------------------

SWAP_HEADER = 4096


def partclone_on_original(bench: Bench) -> None:
    """Used-blocks imaging as Clonezilla runs it, one step after another:
    `partclone.<fs> -c | zstd -T0 -3` for every partition partclone knows, over
    read-only loop devices; partclone.dd for partitions without a known
    filesystem; swap as its header page (Clonezilla keeps even less: it re-runs
    mkswap on restore); an LVM2 PV as its label and metadata (Clonezilla keeps
    `vgcfgbackup`'s text) and each logical volume through partclone as a
    partition is, its free extents left out; the MBR, gaps and unpartitioned
    space raw through `zstd -T0 -3`. It drops deleted data and swap content, so
    its size is a floor, not a peer of a bit-exact image."""
    disk = shlex.quote(str(bench.disk))
    output = bench.path("partclone")
    output.mkdir()
    log = output / "partclone.log"

    def destination(name: str) -> str:
        return shlex.quote(str(output / name))

    def raw_copy(offset: int, size: int, name: str) -> str:
        return (f"dd if={disk} iflag=skip_bytes,count_bytes skip={offset} count={size} bs=4M "
                f"status=none | zstd -T0 -3 -q > {destination(name)}")

    steps, cursor = [], 0
    with contextlib.ExitStack() as loops:
        devices = []

        def partclone(start: int, size: int, filesystem: str | None, name: str) -> str:
            device = loops.enter_context(loop_device(bench.disk, start, size, read_only=True))
            devices.append(Path(device))
            tool = _partclone_tool(filesystem)
            return (f"partclone.{tool} -c -q -L {shlex.quote(str(log))} -s {device} "
                    f"-o - | zstd -T0 -3 -q > {destination(f'{name}.{tool}.pc.zst')}")

        for number, entry in enumerate(layout.partitions(str(bench.disk)), start=1):
            start = entry["start"] * entry["sectorsize"]
            size = entry["size"] * entry["sectorsize"]
            if start > cursor:
                steps.append(raw_copy(cursor, start - cursor, f"gap-{cursor}.zst"))
            filesystem = _filesystem(bench.disk, start, size)
            if filesystem == "swap":
                steps.append(raw_copy(start, SWAP_HEADER, f"p{number}.swap-header.zst"))
            elif filesystem == usedmap.LVM_MEMBER:
                pv = _physical_volume(bench.disk, start, size)
                steps.append(raw_copy(start, pv.data_start, f"p{number}.lvm-metadata.zst"))
                for volume in pv.volumes:
                    volume_start = start + volume.start
                    steps.append(partclone(
                        volume_start, volume.size,
                        _filesystem(bench.disk, volume_start, volume.size),
                        lvm.file_name(volume.name)))
            else:
                steps.append(partclone(start, size, filesystem, f"p{number}"))
            cursor = max(cursor, start + size)
        if cursor < bench.disk_size:
            steps.append(raw_copy(cursor, bench.disk_size - cursor, f"gap-{cursor}.zst"))
        result = bench.measure("partclone.backup",
                               "Clonezilla: partclone + zstd -T0 -3 (used blocks)",
                               pipeline("\n".join(steps)), inputs=[bench.disk, *devices])
    log.unlink(missing_ok=True)
    if not result.error:
        result.output_bytes = tree_bytes(output)
        result.note = "not bit-exact: no deleted data, swap header only"


def _filesystem(disk: Path, start: int, size: int) -> str | None:
    try:
        return usedmap.probe(str(disk), start, size)[0]
    except usedmap.Unmappable:
        return None


def _physical_volume(disk: Path, start: int, size: int) -> lvm.PhysicalVolume:
    """The PV at start..start+size of `disk`, as Clonezilla would find it through LVM's
    tools; each of its volumes must be one range, which a loop device shows as device-mapper
    would (this machine has none)."""
    with open(disk, "rb") as handle:
        pv = lvm.read_pv(lambda offset, length: os.pread(handle.fileno(), length, start + offset),
                         size)
    other = [volume.name for volume in pv.volumes if not volume.contiguous]
    if other:
        raise RuntimeError(f"the Clonezilla pipeline here reads volumes in one range only: "
                           f"{other}")
    return pv


def _partclone_tool(filesystem: str | None) -> str:
    if filesystem in usedmap.EXT_TYPES:
        return filesystem
    return usedmap.PARTCLONE_TOOLS.get(filesystem, "dd")


@dataclass
class Peer:
    name: str
    tools: list[str]
    on_original: Callable[[Bench], None]
    on_changed: Callable[[Bench], None] | None = None
    # Off by default when it would dominate the run time.
    default: bool = True
    # Slow peers run in the first round only: their seconds-long noise is
    # small next to their minutes of runtime.
    repeat: bool = True

    def missing_tools(self) -> list[str]:
        return [tool for tool in self.tools if shutil.which(tool) is None]


PEERS = [
    Peer("ours", [], ours_on_original, ours_on_changed),
    Peer("encrypted", ["openssl"], encrypted_on_original, encrypted_on_changed),
    Peer("borg", ["borg"], borg_on_original, borg_on_changed),
    Peer("zstd", ["zstd", "dd"], zstd_on_original),
    Peer("gzip", ["dd", "gzip"], gzip_on_original, repeat=False),
    # ~4 min for 1 GiB on 2 cores.
    Peer("7za", ["7za"], sevenzip_on_original, default=False, repeat=False),
    Peer("partclone", ["partclone.ext4", "zstd"], partclone_on_original),
]
