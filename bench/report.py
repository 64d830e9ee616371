"""Markdown tables: the targets with pass/fail, then every run's absolute figures."""

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.peers import Run
from bench.system import MiB

NEW_BYTES_LIMIT = 0.02
MEMORY_LIMIT = 300 * MiB
# Used-mode backups (bench.used_peers): ours / Clonezilla, and raw / used.
USED_STORE_TARGET = 1.02
USED_THROUGHPUT_TARGET = 1.5
RAW_OVER_USED_TARGET = 2.5
# Export (bench.export_peers): ours / the classic gunzip | 7za a, and 7za x / zstd -d.
EXPORT_SIZE_TARGET = 1.01
EXPORT_TIME_TARGET = 1.0
DECOMPRESSION_TARGET = 10.0
# A partition restore against the whole disk's, in bytes per second.
PARTITION_RESTORE_TARGET = 0.9
# An encrypted datastore against a plain one: backup and restore speed, store size.
ENCRYPTED_SPEED_TARGET = 0.9
ENCRYPTED_SIZE_TARGET = 1.005
# Other work worth a quarter of a CPU during a run makes its wall time suspect.
BUSY_MACHINE_SHARE = 0.25


@dataclass
class Results:
    runs: dict[str, Run]
    disk_size: int
    # Rows a section makes itself (bench.web), in the targets table's columns, appended to it.
    rows: list[list[str]] = field(default_factory=list)


def throughput(results: Results, run: Run) -> float:
    return (run.size or results.disk_size) / MiB / run.seconds


def stored(results: Results, run: Run) -> float | None:
    return run.output_bytes


def wall_seconds(results: Results, run: Run) -> float:
    return run.seconds


def new_bytes(results: Results, run: Run) -> float | None:
    return run.new_bytes


@dataclass
class Comparison:
    """ours/peer on one measure, checked against a target ratio."""
    criterion: str
    ours: str
    peer: str
    measure: Callable[[Results, Run], float]
    unit: str
    target: float | None = None
    better: Callable[[float, float], bool] = operator.ge

    def row(self, results: Results) -> list[str]:
        ours, peer = results.runs.get(self.ours), results.runs.get(self.peer)
        missing = _why_missing(ours, peer) or next(
            (f"no figure for {run.label}" for run in (ours, peer)
             if self.measure(results, run) is None), "")
        if missing:
            return [self.criterion, _cell(results, ours, self), _cell(results, peer, self), "",
                    self._target(), f"n/a ({missing})"]
        ratio = self.measure(results, ours) / self.measure(results, peer)
        if self.target is None:
            verdict = "info"
        else:
            verdict = "PASS" if self.better(ratio, self.target) else "FAIL"
        if ours.identical is False:
            verdict = "FAIL (restored image differs)"
        return [self.criterion, _cell(results, ours, self), _cell(results, peer, self),
                f"{ratio:.3f}x", self._target(), verdict]

    def _target(self) -> str:
        if self.target is None:
            return "info"
        return f"{'≥' if self.better is operator.ge else '≤'} {self.target:g}x"


def _why_missing(*runs: Run | None) -> str:
    for run in runs:
        if run is None:
            return "not run"
        if run.error:
            return run.error
    return ""


def _cell(results: Results, run: Run | None, comparison: Comparison) -> str:
    if run is None or run.error:
        return "—"
    value = comparison.measure(results, run)
    if value is None:
        return "—"
    if comparison.unit == "MiB/s":
        figure = f"{value:.0f} MiB/s"
    elif comparison.unit == "s":
        figure = f"{value:.1f} s"
    else:
        figure = _size(value)
    if run.extrapolated:
        figure += f" ({run.extrapolated})"
    return figure if run is results.runs.get(comparison.ours) else f"{run.label}: {figure}"


def _size(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f} MiB"


BACKUP_COMPARISONS = [
    Comparison("First backup throughput vs borg", "ours.first", "borg.first", throughput, "MiB/s",
               1.5),
    Comparison("Store size vs borg repo", "ours.first", "borg.first", stored, "bytes", 1.0,
               operator.le),
    Comparison("Store size vs zstd -T0 -3", "ours.first", "zstd.compress", stored, "bytes", 1.02,
               operator.le),
    Comparison("First backup throughput vs zstd -T0 -3 (the ceiling)", "ours.first",
               "zstd.compress", throughput, "MiB/s"),
    Comparison("First backup throughput vs dd | gzip -9", "ours.first", "gzip.compress", throughput,
               "MiB/s", 30),
    Comparison("Unchanged re-backup speed vs our first backup", "ours.unchanged", "ours.first",
               throughput, "MiB/s", 2),
    Comparison("Unchanged re-backup speed vs borg re-backup", "ours.unchanged", "borg.unchanged",
               throughput, "MiB/s", 1.5),
]
RESTORE_COMPARISONS = [
    Comparison("Restore --no-verify throughput vs zstd -dc | dd", "ours.restore", "zstd.restore",
               throughput, "MiB/s", 1.0),
    Comparison("Verified restore throughput vs zstd -dc | dd", "ours.restore_verified",
               "zstd.restore", throughput, "MiB/s"),
    Comparison("Partition restore --no-verify throughput vs whole-disk restore",
               "ours.restore_partition", "ours.restore", throughput, "MiB/s",
               PARTITION_RESTORE_TARGET),
    Comparison("Verified partition restore throughput vs verified whole-disk restore",
               "ours.restore_partition_verified", "ours.restore_verified", throughput, "MiB/s",
               PARTITION_RESTORE_TARGET),
]
USED_COMPARISONS = [
    Comparison("Used-mode store vs Clonezilla (partclone + zstd -T0 -3)", "used.ours",
               "partclone.backup", stored, "bytes", USED_STORE_TARGET, operator.le),
    Comparison("Used-mode backup throughput vs Clonezilla", "used.ours", "partclone.backup",
               throughput, "MiB/s", USED_THROUGHPUT_TARGET),
    Comparison("Raw-mode store / used-mode store (ours)", "used.raw", "used.ours", stored,
               "bytes", RAW_OVER_USED_TARGET),
    # Used mode's price: blocks freed by rewritten files turn to zeros, so their chunks change.
    Comparison("New bytes after a 16 MiB change, used mode vs raw mode (ours)", "used.changed",
               "ours.changed", new_bytes, "bytes"),
]
ENCRYPTED_COMPARISONS = [
    Comparison("Encrypted first backup throughput vs plain", "encrypted.first", "ours.first",
               throughput, "MiB/s", ENCRYPTED_SPEED_TARGET),
    Comparison("Encrypted store size vs plain", "encrypted.first", "ours.first", stored, "bytes",
               ENCRYPTED_SIZE_TARGET, operator.le),
    Comparison("Encrypted re-backup new bytes vs plain, after the change", "encrypted.changed",
               "ours.changed", new_bytes, "bytes"),
    Comparison("Encrypted restore --no-verify throughput vs plain", "encrypted.restore",
               "ours.restore", throughput, "MiB/s", ENCRYPTED_SPEED_TARGET),
]
EXPORT_COMPARISONS = [
    Comparison("Export --level 19 --long size vs gunzip -c | 7za a", "export.ours", "export.7za",
               stored, "bytes", EXPORT_SIZE_TARGET, operator.le),
    Comparison("Export --level 19 --long time vs gunzip -c | 7za a", "export.ours", "export.7za",
               wall_seconds, "s", EXPORT_TIME_TARGET, operator.le),
    Comparison("Decompression speed: zstd -d of the export vs 7za x", "export.ours_decode",
               "export.7za_decode", throughput, "MiB/s", DECOMPRESSION_TARGET),
]


def _new_bytes_row(results: Results) -> list[str]:
    criterion = "New bytes stored (compressed) after a 16 MiB change, % of disk"
    ours, borg = results.runs.get("ours.changed"), results.runs.get("borg.changed")
    borg_cell = "—" if _why_missing(borg) else \
        f"borg repo growth: {_size(borg.new_bytes)} ({borg.new_bytes / results.disk_size:.2%})"
    missing = _why_missing(ours)
    if missing:
        return [criterion, "—", borg_cell, "", f"≤ {NEW_BYTES_LIMIT:.0%}", f"n/a ({missing})"]
    share = ours.new_bytes / results.disk_size
    return [criterion, f"{_size(ours.new_bytes)} ({share:.2%})", borg_cell, "",
            f"≤ {NEW_BYTES_LIMIT:.0%}", "PASS" if share <= NEW_BYTES_LIMIT else "FAIL"]


def _memory_row(results: Results) -> list[str]:
    criterion = "Peak memory of our backup (max of the three)"
    ours = [results.runs.get(key) for key in ("ours.first", "ours.unchanged", "ours.changed")]
    measured = [run for run in ours if run is not None and not run.error]
    borg = results.runs.get("borg.first")
    borg_cell = "—" if _why_missing(borg) else f"borg: {_size(borg.peak_memory)}"
    if not measured:
        return [criterion, "—", borg_cell, "", f"≤ {MEMORY_LIMIT // MiB} MiB",
                f"n/a ({_why_missing(*ours)})"]
    peak = max(run.peak_memory for run in measured)
    return [criterion, _size(peak), borg_cell, "", f"≤ {MEMORY_LIMIT // MiB} MiB",
            "PASS" if peak <= MEMORY_LIMIT else "FAIL"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(results: Results) -> str:
    rows = [comparison.row(results) for comparison in BACKUP_COMPARISONS]
    rows.append(_new_bytes_row(results))
    rows += [comparison.row(results) for comparison in RESTORE_COMPARISONS]
    rows.append(_memory_row(results))
    rows += [comparison.row(results) for comparison in ENCRYPTED_COMPARISONS]
    rows += [comparison.row(results) for comparison in USED_COMPARISONS + EXPORT_COMPARISONS]
    rows += results.rows
    return _table(["Criterion", "Ours", "Peer", "Ours/peer", "Target", "Result"], rows)


def runs_table(results: Results) -> str:
    rows = []
    for run in results.runs.values():
        if run.error:
            rows.append([run.label, "", "", "", "", "", "", "", run.error])
            continue
        output = "" if run.output_bytes is None else \
            f"{_size(run.output_bytes)} ({run.output_bytes / results.disk_size:.1%})"
        if run.new_bytes is not None:
            output += f", new {_size(run.new_bytes)}"
        identical = {None: "", True: "yes", False: "NO"}[run.identical]
        seconds = f"{run.seconds:.2f}"
        if run.spread:
            seconds += f" ({run.spread[0]:.2f}–{run.spread[1]:.2f})"
        other_cpu = f"{run.other_cpu_seconds:.1f}"
        if disturbed(run):
            other_cpu += " ⚠"
        rows.append([run.label, seconds, f"{throughput(results, run):.1f}", output,
                     _size(run.peak_memory), f"{run.cpu_seconds:.1f}", other_cpu, identical,
                     run.note])
    return _table(["Run", "Wall s, median (range)", "MiB/s of disk", "Output (of disk)",
                   "Peak memory", "CPU s", "Other CPU s", "Restored = disk", "Notes"], rows)


def disturbed(run: Run) -> bool:
    return run.other_cpu_seconds > BUSY_MACHINE_SHARE * run.seconds
