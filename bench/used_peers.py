"""Used-blocks imaging: ours against the Clonezilla way, on one disk image.

The "used" section of `python -m bench` (every round); `run(disk_path,
workdir)` (workdir: an empty directory) runs it alone. Both time, with a warm
page cache and a sync inside the timed span (bench.measure.timed):
  - ours, `backup --mode used`;
  - the Clonezilla pipeline (bench.peers.partclone_on_original: partclone
    per known filesystem, swap header, raw gaps, all through zstd -T0 -3),
    unless the partclone peer already measured it on this disk;
  - ours, `backup --mode raw`, for the size ratio;
  - after the change, ours, `backup --mode used` again into the same store,
    for its new bytes (against the raw re-backup of the ours peer).
`run` returns the targets as rows [criterion, ours, peer, ours/peer, target,
result], the shape of bench.report's targets table.
"""

from pathlib import Path

from bench.peers import Bench, Peer, ours_backup, partclone_on_original
from bench.report import USED_COMPARISONS, Results

REPO_ROOT = Path(__file__).resolve().parent.parent
USED_CHANGED_LABEL = "ours: backup --mode used after 16 MiB change"


def used_on_original(bench: Bench) -> None:
    if "partclone.backup" not in bench.runs:
        partclone_on_original(bench)
    ours_backup(bench, "used.ours", "ours: backup --mode used", bench.path("used-store"),
                "--mode", "used")
    ours_backup(bench, "used.raw", "ours: backup --mode raw (for raw/used)",
                bench.path("raw-store"), "--mode", "raw")


def used_on_changed(bench: Bench) -> None:
    if bench.runs["used.ours"].error:
        bench.fail("used.changed", USED_CHANGED_LABEL, "first used-mode backup failed")
        return
    ours_backup(bench, "used.changed", USED_CHANGED_LABEL, bench.path("used-store"),
                "--mode", "used")


def run(disk_path, workdir) -> list[list[str]]:
    disk, workdir = Path(disk_path), Path(workdir)
    bench = Bench(disk=disk, workdir=workdir, repo_root=REPO_ROOT, gzip_sample=0)
    used_on_original(bench)
    results = Results(bench.runs, bench.disk_size)
    return [comparison.row(results) for comparison in USED_COMPARISONS]


PEER = Peer("used", ["partclone.ext4", "zstd", "dd"], used_on_original, used_on_changed)
