"""Fourteen nights of a disk's life, backed up every night by every tool.

Night 0 backs up the benchmark disk as built. Each of nights 1 to 14 then
changes one working copy of it (its ext4 partition mounted through a loop
device) and backs it up with each tool in turn, each into a repository of its
own that keeps every night:

- ours, raw mode and used mode (`imaging.backup.backup`, in-process, one
  datastore per mode);
- borg 1.2: `borg create --compression zstd,3 --read-special`, unencrypted,
  one archive per night, files cache disabled (a disk *file*'s stat() would
  let borg skip reading it, which a block device never allows);
- restic: `restic backup --stdin`, repository version 2, compression auto;
- the classic `dd | gzip -9`, one new .gz file per night. gzip -9 runs at
  ~14 MiB/s, ~75 s per night here, so, like the main table, it is timed on
  evenly spaced slices of the disk (GZIP_SAMPLE in GZIP_SLICES) and its time
  and size are scaled up.

A night's change, drawn from random.Random(f"{seed}/{night}") and the
sorted file listing, so the same disk gets the same sequence every run:

- editor-style rewrites: 10-40 text files of 4 KiB-1 MiB (sources, docs,
  configs), each given 1-4 edited or inserted lines, saved as a new file
  renamed over the old one;
- appended logs: 512 KiB-2 MiB of timestamped lines each to four logs
  (syslog, auth.log, a web server's access log, an application's JSON log),
  created on night 1;
- a package upgrade: 200-400 consecutive files (by path) under usr/, at
  least 6 MiB, at most 600 files or 16 MiB, each replaced the way dpkg does
  it (a .dpkg-new file renamed over the old one) by a new version: a few
  bytes patched, a few appended;
- 20-60 deleted files;
- one of the ten largest files moved to another directory (a rename: its
  data stays where it is).

That writes ~10-30 MiB of files a night; the disk blocks that really changed
(4 KiB blocks, journal and metadata included) are measured too.

After each night's backups, ours (raw mode) and restic's repositories are copied
off site to an SFTP server on loopback, and ours against `rclone copy` of the same
folder (bench/offsite.py).

Sizes are the apparent sizes of all regular files in each repository
directory (bench.system.tree_bytes; borg's and restic's local caches live
outside them); times are wall seconds of each night's backup, each ending
with a `sync`. The per-night figures go to bench/history.json and a chart to
docs/history.svg.

`python -m bench.history DISK [WORKDIR]` runs it alone on a disk from
`python -m bench.disk`.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import offsite
from bench.measure import CommandFailed, timed
from bench.peers import GZIP_SLICES, Bench, gzip_on_original
from bench.system import LINUX_TYPE, MiB, exit_cleanly_on_signals, mounted_partition, tree_bytes
from imaging.backup import backup
from imaging.base.errors import ImagingError

REPO_ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = REPO_ROOT / "bench" / "history.json"
SVG_PATH = REPO_ROOT / "docs" / "history.svg"

NIGHTS = 14
SEED = 1
RESTIC_REPOSITORY = "restic-repo"
OURS_RAW_STORE = "ours-raw"
REPORTED_NIGHTS = (0, 1, 7, 14)
GZIP_SAMPLE = 64 * MiB
BLOCK = 4096

# Targets, ours / borg.
FINAL_SIZE_TARGET = 0.85
FIRST_SIZE_TARGET = 1.03
FIRST_THROUGHPUT_TARGET = 1.5

# The nightly mix (see the module docstring).
REWRITE_FILES = (10, 40)
REWRITE_SIZES = (4096, MiB)
TEXT_SUFFIXES = {".py", ".txt", ".h", ".c", ".cmake", ".sh", ".conf", ".md", ".rst", ".html",
                 ".json", ".xml", ".ini", ".cfg", ".el", ".pl", ".pm", ".tcl", ".css", ".js"}
LOG_FILES = ("var/log/syslog", "var/log/auth.log", "var/log/nginx/access.log",
             "var/log/app/worker.log")
LOG_BYTES = (512 * 1024, 2 * MiB)
UPGRADE_TREE = "usr"
UPGRADE_FILES = (200, 400)
UPGRADE_MIN_BYTES = 6 * MiB
UPGRADE_MAX_BYTES = 16 * MiB
UPGRADE_MAX_FILES = 600
UPGRADE_MAX_FILE = 4 * MiB
DELETED_FILES = (20, 60)
MOVE_AMONG_LARGEST = 10
MOVE_DESTINATION = "home/user/archive"
FIRST_NIGHT = datetime.datetime(2026, 1, 1, 23, 0, tzinfo=datetime.timezone.utc)
WORDS = ("the", "value", "return", "config", "path", "self", "if", "else", "for", "None",
         "error", "default", "user", "host", "timeout", "list", "update", "TODO", "fix",
         "version", "=", "(", ")", ":", "#", "0", "1", "True", "False", "data")


# --- the nightly change -----------------------------------------------------

@dataclass(frozen=True)
class NightPlan:
    """What one night changes, as paths relative to the partition's root."""
    night: int
    rewrites: tuple[str, ...]
    logs: tuple[tuple[str, int], ...]  # (log file, bytes to append)
    upgrade: tuple[str, ...]
    deletions: tuple[str, ...]
    move: tuple[str, str]  # (from, to)


def night_rng(seed: int, night: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{night}/{purpose}")


def list_files(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file, in sorted path order."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if Path(directory, d) != root / "lost+found")
        for name in sorted(names):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                found.append((str(path.relative_to(root)), path.stat().st_size))
    return found


def plan_night(files: list[tuple[str, int]], night: int, seed: int = SEED) -> NightPlan:
    """Choose what the night changes, from the file listing and the seed alone."""
    rng = night_rng(seed, night, "plan")
    logs = set(LOG_FILES)
    candidates = [(path, size) for path, size in files if path not in logs]

    largest = sorted(candidates, key=lambda entry: (-entry[1], entry[0]))[:MOVE_AMONG_LARGEST]
    moved = rng.choice(largest)[0]
    move = (moved, f"{MOVE_DESTINATION}/night-{night:02d}/{Path(moved).name}")

    in_tree = [(path, size) for path, size in candidates
               if path.startswith(UPGRADE_TREE + "/") and path != moved
               and size <= UPGRADE_MAX_FILE]
    wanted_files = rng.randint(*UPGRADE_FILES)
    start = rng.randrange(len(in_tree))
    upgrade, upgraded_bytes = [], 0
    for path, size in in_tree[start:] + in_tree[:start]:
        if (len(upgrade) >= wanted_files and upgraded_bytes >= UPGRADE_MIN_BYTES) \
                or len(upgrade) >= UPGRADE_MAX_FILES \
                or upgraded_bytes + size > UPGRADE_MAX_BYTES:
            break
        upgrade.append(path)
        upgraded_bytes += size

    taken = set(upgrade) | {moved}
    texts = [(path, size) for path, size in candidates
             if Path(path).suffix in TEXT_SUFFIXES and path not in taken
             and REWRITE_SIZES[0] <= size <= REWRITE_SIZES[1]]
    rewrites = rng.sample([path for path, _ in texts],
                          min(len(texts), rng.randint(*REWRITE_FILES)))

    taken |= set(rewrites)
    remaining = [path for path, _ in candidates if path not in taken]
    deletions = rng.sample(remaining, min(len(remaining), rng.randint(*DELETED_FILES)))
    return NightPlan(
        night=night, rewrites=tuple(rewrites),
        logs=tuple((log, rng.randint(*LOG_BYTES)) for log in LOG_FILES),
        upgrade=tuple(upgrade), deletions=tuple(sorted(deletions)), move=move)


def _replace(path: Path, content: bytes, suffix: str) -> None:
    """Save a new version the way editors and dpkg do: a new file renamed over the old."""
    replacement = path.with_name(path.name + suffix)
    replacement.write_bytes(content)
    replacement.replace(path)


def _edited(content: bytes, rng: random.Random) -> bytes:
    """The text with 1-4 lines edited or inserted at random places."""
    edited = bytearray(content)
    for _ in range(rng.randint(1, 4)):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).encode() + b"\n"
        start = edited.find(b"\n", rng.randrange(len(edited))) + 1 or len(edited)
        end = start
        if rng.random() < 0.5:  # an edited line rather than a new one
            end = edited.find(b"\n", start) + 1 or len(edited)
        edited[start:end] = line
    return bytes(edited)


def _upgraded(content: bytes, rng: random.Random) -> bytes:
    """A package's next version of a file: a few bytes patched, a few appended."""
    upgraded = bytearray(content)
    for _ in range(rng.randint(1, 8) if upgraded else 0):
        upgraded[rng.randrange(len(upgraded))] ^= rng.randint(1, 255)
    return bytes(upgraded) + rng.randbytes(rng.randint(4, 64))


def _log_lines(log: str, count_bytes: int, night: int, rng: random.Random) -> bytes:
    """count_bytes (or a line more) of plausible lines for one of LOG_FILES."""
    moment = FIRST_NIGHT + datetime.timedelta(days=night - 1)
    hosts = [f"192.168.1.{number}" for number in range(2, 40)]
    lines, written = [], 0
    while written < count_bytes:
        moment += datetime.timedelta(milliseconds=rng.randint(1, 4000))
        stamp = moment.strftime("%b %d %H:%M:%S")
        if log.endswith("syslog"):
            unit = rng.choice(["systemd[1]", "kernel", "CRON[4120]", "dockerd[811]", "smartd[602]"])
            line = (f"{stamp} homelab {unit}: "
                    + rng.choice([f"Started session {rng.randint(1, 9999)} of user root.",
                                  f"eth0: link up, {rng.choice([100, 1000])} Mbps full duplex",
                                  f"(root) CMD (run-parts /etc/cron.hourly) pid={rng.randint(1000, 65000)}",
                                  f"container {rng.randbytes(6).hex()} health_status: healthy",
                                  f"Device: /dev/sda, temperature {rng.randint(28, 45)} C"]))
        elif log.endswith("auth.log"):
            line = (f"{stamp} homelab sshd[{rng.randint(1000, 65000)}]: Accepted publickey for "
                    f"{rng.choice(['admin', 'backup', 'deploy'])} from {rng.choice(hosts)} port "
                    f"{rng.randint(30000, 65000)} ssh2: ED25519 SHA256:"
                    f"{rng.randbytes(32).hex()[:43]}")
        elif log.endswith("access.log"):
            page = rng.choice(["/", "/api/disks/", "/api/images/?disk=3", "/static/app.js",
                               f"/images/{rng.randint(1, 500)}/", "/favicon.ico"])
            line = (f"{rng.choice(hosts)} - - [{moment.strftime('%d/%b/%Y:%H:%M:%S +0000')}] "
                    f"\"GET {page} HTTP/1.1\" {rng.choice([200, 200, 200, 304, 404])} "
                    f"{rng.randint(200, 90000)} \"-\" \"Mozilla/5.0 (X11; Linux x86_64)\"")
        else:
            line = json.dumps({"ts": moment.isoformat(timespec="milliseconds"),
                               "level": rng.choice(["info", "info", "info", "warning"]),
                               "task": rng.choice(["backup", "verify", "prune", "inventory"]),
                               "job": rng.randint(1, 100000), "id": rng.randbytes(8).hex(),
                               "ms": rng.randint(1, 30000)})
        lines.append(line)
        written += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def apply_night(root: Path, plan: NightPlan, seed: int = SEED) -> int:
    """Make the planned changes under root; returns the bytes of files written."""
    rng = night_rng(seed, plan.night, "content")
    written = 0
    for log, count in plan.logs:
        text = _log_lines(log, count, plan.night, rng)
        (root / log).parent.mkdir(parents=True, exist_ok=True)
        with open(root / log, "ab") as handle:
            handle.write(text)
        written += len(text)
    for path in plan.rewrites:
        content = _edited((root / path).read_bytes(), rng)
        _replace(root / path, content, ".swp")
        written += len(content)
    for path in plan.upgrade:
        content = _upgraded((root / path).read_bytes(), rng)
        _replace(root / path, content, ".dpkg-new")
        written += len(content)
    for path in plan.deletions:
        (root / path).unlink()
    source, target = plan.move
    (root / target).parent.mkdir(parents=True, exist_ok=True)
    (root / source).rename(root / target)
    return written


def change_disk(disk: Path, night: int, seed: int = SEED) -> tuple[NightPlan, int]:
    """Apply the night's change to the disk's ext4 partition: (the plan, bytes written)."""
    with mounted_partition(disk, LINUX_TYPE) as root:
        plan = plan_night(list_files(root), night, seed)
        return plan, apply_night(root, plan, seed)


def block_digests(disk: Path) -> list[bytes]:
    """A short digest of every 4 KiB block, to count what a night changed on the disk."""
    digests = []
    with open(disk, "rb", buffering=0) as handle:
        while piece := handle.read(4 * MiB):
            view = memoryview(piece)
            digests.extend(hashlib.blake2b(view[offset:offset + BLOCK], digest_size=8).digest()
                           for offset in range(0, len(view), BLOCK))
    return digests


# --- the tools --------------------------------------------------------------

@dataclass
class Tool:
    key: str
    label: str
    legend: str  # the chart's shorter name
    # Backs the disk up for the night; returns (wall seconds, repository bytes).
    back_up: Callable[[int], tuple[float, int]]
    note: str = ""
    sizes: list[int | None] = field(default_factory=list)
    seconds: list[float | None] = field(default_factory=list)
    error: str | None = None


class ToolFailed(Exception):
    pass


def _ours(disk: Path, store: Path, mode: str) -> Callable[[int], tuple[float, int]]:
    def back_up(night: int) -> tuple[float, int]:
        os.sync()
        started = time.perf_counter()
        try:
            backup(str(disk), store, disk_id="history", mode=mode)
        except ImagingError as failure:
            raise ToolFailed(str(failure)) from None
        os.sync()
        return time.perf_counter() - started, tree_bytes(store)
    return back_up


def _command(argv: list[str], repository: Path, **options) -> tuple[float, int]:
    try:
        seconds = timed(argv, **options).seconds
    except CommandFailed as failure:
        raise ToolFailed(str(failure)) from None
    return seconds, tree_bytes(repository)


def _borg(disk: Path, workdir: Path) -> Callable[[int], tuple[float, int]]:
    repository = workdir / "borg-repo"
    env = os.environ | {"BORG_BASE_DIR": str(workdir / "borg-base"),
                        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_PASSPHRASE": ""}

    def back_up(night: int) -> tuple[float, int]:
        if night == 0:
            _command(["borg", "init", "-e", "none", str(repository)], repository, env=env)
        return _command(["borg", "create", "--compression", "zstd,3", "--read-special",
                         "--files-cache=disabled", f"{repository}::night-{night:02d}", str(disk)],
                        repository, env=env)
    return back_up


def _restic_env(workdir: Path) -> dict[str, str]:
    return os.environ | {"RESTIC_PASSWORD": "history",
                         "RESTIC_CACHE_DIR": str(workdir / "restic-cache")}


def _restic(disk: Path, workdir: Path) -> Callable[[int], tuple[float, int]]:
    repository = workdir / RESTIC_REPOSITORY
    env = _restic_env(workdir)

    def back_up(night: int) -> tuple[float, int]:
        if night == 0:
            _command(["restic", "init", "--repository-version", "2", "--repo", str(repository)],
                     repository, env=env)
        return _command(["restic", "backup", "--repo", str(repository), "--host", "history",
                         "--stdin", "--stdin-filename", "disk.img"],
                        repository, env=env, stdin=disk)
    return back_up


def _gzip(disk: Path, workdir: Path, sample: int) -> Callable[[int], tuple[float, int]]:
    """One gzip -9 file per night, timed and sized by the main table's slice extrapolation."""
    nightly: list[int] = []

    def back_up(night: int) -> tuple[float, int]:
        night_dir = workdir / "gzip" / f"night-{night:02d}"
        night_dir.mkdir(parents=True)
        bench = Bench(disk=disk, workdir=night_dir, repo_root=REPO_ROOT, gzip_sample=sample)
        gzip_on_original(bench)
        result = bench.runs["gzip.compress"]
        if result.error:
            raise ToolFailed(result.error)
        nightly.append(result.output_bytes)
        return result.seconds, sum(nightly)
    return back_up


def tools(disk: Path, workdir: Path, gzip_sample: int = GZIP_SAMPLE) -> list[Tool]:
    """Every tool in running order; those whose command is missing are left out."""
    gzip_note = (f"time and size extrapolated from {gzip_sample // MiB} MiB in {GZIP_SLICES} "
                 "slices, per night" if gzip_sample < disk.stat().st_size else "")
    candidates = [
        (Tool("ours-raw", "ours, raw mode", "ours, raw",
              _ours(disk, workdir / OURS_RAW_STORE, "raw")), None),
        (Tool("ours-used", "ours, used mode", "ours, used",
              _ours(disk, workdir / "ours-used", "used")), None),
        (Tool("borg", "borg --compression zstd,3 --read-special", "borg (zstd,3)",
              _borg(disk, workdir)), "borg"),
        (Tool("restic", "restic backup --stdin", "restic (--stdin)",
              _restic(disk, workdir)), "restic"),
        (Tool("gzip", "dd | gzip -9, a file per night", "dd | gzip -9 (all files)",
              _gzip(disk, workdir, gzip_sample), note=gzip_note), "gzip"),
    ]
    return [tool for tool, command in candidates if command is None or shutil.which(command)]


# --- the run ----------------------------------------------------------------

@dataclass
class History:
    disk_size: int
    seed: int
    tools: list[Tool]
    missing: list[str]
    written: list[int] = field(default_factory=list)  # bytes of files each night wrote
    changed: list[int] = field(default_factory=list)  # bytes of 4 KiB disk blocks that changed
    plans: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # The machine's 1-minute load average when the section started and ended.
    load: tuple[float, float] = (0.0, 0.0)
    copies: offsite.Offsite | None = None  # each night's off-site copies (bench/offsite.py)

    def tool(self, key: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.key == key), None)


def _back_up_all(history: History, night: int, progress: Callable[[str], None]) -> None:
    for tool in history.tools:
        if tool.error:
            tool.sizes.append(None)
            tool.seconds.append(None)
            continue
        progress(f"history night {night}: {tool.label}")
        try:
            seconds, size = tool.back_up(night)
        except (ToolFailed, OSError, RuntimeError) as failure:
            tool.error = f"night {night}: {failure}"
            seconds = size = None
        tool.sizes.append(size)
        tool.seconds.append(seconds)


def run_history(pristine: Path, workdir: Path, nights: int = NIGHTS, seed: int = SEED,
                gzip_sample: int = GZIP_SAMPLE,
                progress: Callable[[str], None] = lambda message: None) -> History:
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "disk.img"
    shutil.copyfile(pristine, disk)
    selected = tools(disk, workdir, gzip_sample)
    missing = [name for name in ("borg", "restic", "gzip")
               if name not in {tool.key for tool in selected}]
    history = History(disk_size=disk.stat().st_size, seed=seed, tools=selected, missing=missing)
    restic = history.tool("restic")
    with offsite.offsite(workdir, workdir / OURS_RAW_STORE,
                         workdir / RESTIC_REPOSITORY if restic else None,
                         _restic_env(workdir)) as copies:
        history.copies = copies
        before = block_digests(disk)
        history.written.append(0)
        history.changed.append(0)
        _back_up_all(history, 0, progress)
        if copies:
            copies.after_night(0, progress)
        for night in range(1, nights + 1):
            progress(f"history night {night}: changing the disk")
            plan, written = change_disk(disk, night, seed)
            after = block_digests(disk)  # also reads the disk into the page cache for every tool
            history.written.append(written)
            history.changed.append(BLOCK * sum(old != new for old, new in zip(before, after)))
            history.plans.append({"night": night, "rewritten_files": len(plan.rewrites),
                                  "log_bytes": sum(count for _, count in plan.logs),
                                  "upgraded_files": len(plan.upgrade),
                                  "deleted_files": len(plan.deletions), "moved": list(plan.move)})
            before = after
            _back_up_all(history, night, progress)
            if copies:
                copies.after_night(night, progress)
    history.seconds = time.perf_counter() - started
    history.load = (load_at_start, os.getloadavg()[0])
    return history


# --- the report -------------------------------------------------------------

def _mib(value: int | None) -> str:
    return "failed" if value is None else f"{value / MiB:.1f} MiB"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def target_lines(history: History) -> list[str]:
    ours, used, borg = history.tool("ours-raw"), history.tool("ours-used"), history.tool("borg")
    last = len(ours.sizes) - 1 if ours else 0
    lines = []

    def compare(criterion: str, measure: Callable[[], tuple[str, bool | str]]) -> None:
        try:
            figures, passed = measure()
        except (TypeError, ZeroDivisionError, AttributeError, IndexError):
            figures, passed = "not measured (a tool failed or is missing)", False
        lines.append(f"{criterion}: {figures}: "
                     f"{passed if isinstance(passed, str) else _verdict(passed)}")

    def final_size() -> tuple[str, bool]:
        ratio = ours.sizes[last] / borg.sizes[last]
        return (f"{_mib(ours.sizes[last])} against {_mib(borg.sizes[last])}, ratio "
                f"{ratio:.3f}, target ≤ {FINAL_SIZE_TARGET:g}", ratio <= FINAL_SIZE_TARGET)

    def used_size() -> tuple[str, bool]:
        return (f"{_mib(used.sizes[last])} against {_mib(ours.sizes[last])}, target ≤ raw",
                used.sizes[last] <= ours.sizes[last])

    def first_size() -> tuple[str, bool]:
        ratio = ours.sizes[0] / borg.sizes[0]
        return (f"{_mib(ours.sizes[0])} against {_mib(borg.sizes[0])}, ratio {ratio:.3f}, "
                f"target ≤ {FIRST_SIZE_TARGET:g}", ratio <= FIRST_SIZE_TARGET)

    def first_throughput() -> tuple[str, bool]:
        ours_rate = history.disk_size / MiB / ours.seconds[0]
        borg_rate = history.disk_size / MiB / borg.seconds[0]
        ratio = ours_rate / borg_rate
        # One timed run each: the target is judged on the main table's medians.
        return (f"{ours_rate:.0f} MiB/s against {borg_rate:.0f} MiB/s, ratio {ratio:.3f} "
                f"(target ≥ {FIRST_THROUGHPUT_TARGET:g}, judged by the first table's "
                "\"First backup throughput vs borg\", a median of rounds)", "info")

    compare(f"History: ours raw datastore after {last} nights vs borg's repository", final_size)
    compare(f"History: ours used-mode datastore vs ours raw after {last} nights", used_size)
    compare("History: first backup (night 0), ours raw size vs borg's", first_size)
    compare("History: first backup (night 0), ours raw throughput vs borg's", first_throughput)
    restic = history.tool("restic")
    return lines + offsite.target_lines(history.copies, ours.sizes if ours else [None],
                                        restic.sizes if restic else [None])


def table(history: History) -> str:
    nights = [night for night in REPORTED_NIGHTS if night < len(history.written)]
    header = ["Tool", *(f"Night {night}" for night in nights), "Night 0 backup",
              "Nightly backup, median (max)"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tool in history.tools:
        nightly = [seconds for seconds in tool.seconds[1:] if seconds is not None]
        first = tool.seconds[0] if tool.seconds else None
        times = (f"{statistics.median(nightly):.2f} s ({max(nightly):.2f} s)" if nightly
                 else "failed")
        label = tool.label + (f" ({tool.note})" if tool.note else "")
        cells = [label.replace("|", "\\|"), *(_mib(tool.sizes[night]) for night in nights),
                 "failed" if first is None else f"{first:.2f} s", times]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary(history: History) -> str:
    written = history.written[1:]
    changed = history.changed[1:]
    text = (f"History: {len(written)} nights on the {history.disk_size / MiB:.0f} MiB disk "
            f"(seed {history.seed}); each night wrote {min(written) / MiB:.1f}-"
            f"{max(written) / MiB:.1f} MiB of files (median {statistics.median(written) / MiB:.1f})"
            f" and changed {min(changed) / MiB:.1f}-{max(changed) / MiB:.1f} MiB of the disk's "
            f"4 KiB blocks (median {statistics.median(changed) / MiB:.1f}). Sizes: apparent bytes "
            "of the regular files in each repository after the night; times: wall seconds of "
            "the night's backup, ending with a sync, each measured once; ours runs in-process, "
            f"the others as commands. Section: {history.seconds / 60:.1f} min, load average "
            f"{history.load[0]:.2f} at its start and {history.load[1]:.2f} at its end.")
    if history.missing:
        text += f" Not run: {', '.join(history.missing)} (not installed)."
    failed = [f"{tool.label} failed on {tool.error}" for tool in history.tools if tool.error]
    if failed:
        text += " " + "; ".join(failed) + "."
    return text


def as_json(history: History) -> dict:
    return {
        "disk_bytes": history.disk_size, "seed": history.seed,
        "size": "apparent bytes of the regular files in the repository after the night",
        "seconds": "wall seconds of the night's backup",
        "section_seconds": round(history.seconds, 1),
        "load_average": list(history.load),
        "nights": [{"night": night, "written_bytes": history.written[night],
                    "changed_disk_bytes": history.changed[night],
                    **({"change": history.plans[night - 1]} if night else {})}
                   for night in range(len(history.written))],
        "tools": {tool.key: {"label": tool.label, "note": tool.note, "error": tool.error,
                             "sizes": tool.sizes,
                             "seconds": [None if s is None else round(s, 3)
                                         for s in tool.seconds]}
                  for tool in history.tools},
        "offsite": history.copies.as_json() if history.copies else None,
        "targets": target_lines(history),
    }


# --- the chart --------------------------------------------------------------

COLOURS = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#ff7f0e")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _log_ticks(low: float, high: float) -> list[float]:
    ticks, decade = [], 10 ** math.floor(math.log10(low))
    while decade <= high:
        ticks += [decade * step for step in (1, 2, 3, 5) if low <= decade * step <= high]
        decade *= 10
    return ticks


def svg_chart(series: dict[str, list[float | None]], title: str,
              x_label: str = "Night", y_label: str = "Repository size, MiB (log scale)") -> str:
    """A line chart, one polyline per series over x = 0, 1, 2...; a log y axis,
    so a tool that grows by a full copy a night and one that grows by a few
    MiB can be read on the same chart."""
    width, height = 720, 440
    left, right, top, bottom = 70, 190, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [value for points in series.values() for value in points if value]
    low, high = min(values) / 1.15, max(values) * 1.15
    count = max(len(points) for points in series.values())

    def x_at(index: int) -> float:
        return left + plot_w * index / max(1, count - 1)

    def y_at(value: float) -> float:
        return top + plot_h * (1 - (math.log(value) - math.log(low))
                               / (math.log(high) - math.log(low)))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left + plot_w / 2}" y="22" text-anchor="middle" font-size="14">'
             f'{_escape(title)}</text>']
    for tick in _log_ticks(low, high):
        y = y_at(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for index in range(count):
        x = x_at(index)
        parts.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" '
                     f'y2="{top + plot_h + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
                     f'{index}</text>')
    parts += [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
              'stroke="#333"/>',
              f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">'
              f'{_escape(x_label)}</text>',
              f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
              f'transform="rotate(-90 18 {top + plot_h / 2})">{_escape(y_label)}</text>']
    for number, (name, points) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        coordinates = " ".join(f"{x_at(index):.1f},{y_at(value):.1f}"
                               for index, value in enumerate(points) if value)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{coordinates}"/>')
        legend_y = top + 10 + 22 * number
        parts.append(f'<rect x="{left + plot_w + 16}" y="{legend_y - 6}" width="18" height="4" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{left + plot_w + 40}" y="{legend_y}">{_escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def chart(history: History) -> str:
    series = {tool.legend: [None if size is None else size / MiB for size in tool.sizes]
              for tool in history.tools}
    return svg_chart(series, f"Repository size over {len(history.written) - 1} nights, "
                             f"{history.disk_size / MiB:.0f} MiB disk")


def report_lines(pristine: Path, workdir: Path, *, nights: int = NIGHTS,
                 json_path: Path = JSON_PATH, svg_path: Path = SVG_PATH,
                 progress: Callable[[str], None] = lambda message: None) -> list[str]:
    """The benchmark's paragraphs: the table, the targets and a summary; also
    writes the per-night figures (JSON) and the chart (SVG)."""
    try:
        history = run_history(pristine, workdir, nights, progress=progress)
    except (ImagingError, OSError, RuntimeError) as failure:
        return [f"History: FAIL ({failure})"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json_path.write_text(json.dumps(as_json(history), indent=1) + "\n")
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    svg_path.write_text(chart(history))
    return [table(history), *target_lines(history), summary(history)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("disk", type=Path, help="a disk image from python -m bench.disk")
    parser.add_argument("workdir", type=Path, nargs="?",
                        help="a temporary directory is made and removed inside it")
    parser.add_argument("--nights", type=int, default=NIGHTS)
    args = parser.parse_args()
    exit_cleanly_on_signals()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        print(f"[history {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="history-", dir=args.workdir) as workdir:
        print("\n\n".join(report_lines(args.disk, Path(workdir) / "history",
                                       nights=args.nights, progress=progress)))


if __name__ == "__main__":
    main()
