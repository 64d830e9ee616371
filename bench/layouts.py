"""The layouts a home lab's other disks have: LVM as Debian's and Ubuntu's installers make it,
XFS and Btrfs partitions as RHEL's and Fedora's do.

The disk (GPT, 1.5 GiB), filled with stale data first as a reused disk is:
  p1   ext4, 128 MiB (/boot)
  p2   LVM2 PV, 800 MiB: vg0/root ext4 256 MiB, vg0/home XFS 320 MiB, and 220 MiB of
       free extents that still hold the stale data
  p3   XFS, 320 MiB
  p4   Btrfs, 256 MiB
  tail unpartitioned stale data
Each filesystem is filled to ~45% with files from /usr, deleted files in its free space,
as bench/disk.py fills the main disk.

Measured once each, with a warm page cache (bench.peers.Bench.measure):
  - ours, `backup --mode used`, against the Clonezilla pipeline
    (bench.peers.partclone_on_original: partclone per partition and per logical volume,
    through zstd -T0 -3), and ours, `backup --mode raw`, for used/raw: target ≤ 0.6;
  - listing the root folder of the XFS partition, the Btrfs partition and both logical
    volumes from the used-mode image (`python -m imaging files IMAGE WHERE /`, from the
    command's start, the median of 5 runs each): target < 2 s.

`python -m bench.layouts [WORKDIR]` runs it alone.
"""

import random
import statistics
import sys
from pathlib import Path

from bench.disk import fill_filesystem, write_stale
from bench.lvm import EXTENT, Volume, make_physical_volume
from bench.peers import Bench, imaging_command, ours_backup, partclone_on_original
from bench.system import MiB, SECTOR, command_seconds, measured, mounted, run, run_alone
from imaging.base.tools import loop_device

REPO_ROOT = Path(__file__).resolve().parent.parent
DISK_SIZE = 1536 * MiB
GROUP = "vg0"
ROOT = Volume("root", 0, 256 * MiB // EXTENT)
HOME = Volume("home", ROOT.extents, 320 * MiB // EXTENT)
# (name, size, what it holds: a filesystem, or the LVM2 PV)
PARTITIONS = [("boot", 128 * MiB, "ext4"), ("pv", 800 * MiB, "lvm"), ("xfs", 320 * MiB, "xfs"),
              ("btrfs", 256 * MiB, "btrfs")]
# nodiscard everywhere: a discard would punch holes in the image file, and a sparse image is
# not what a real disk looks like.
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-E",
                 "nodiscard,lazy_itable_init=0,lazy_journal_init=0"],
        "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
        "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"]}
TOOLS = ["partclone.ext4", "partclone.xfs", "partclone.btrfs", "zstd", "mkfs.xfs",
         "mkfs.btrfs", "pvcreate"]
LISTED = [("the XFS partition", "3"), ("the Btrfs partition", "4"),
          ("the ext4 LV", f"{GROUP}/{ROOT.name}"), ("the XFS LV", f"{GROUP}/{HOME.name}")]
ROUNDS = 5
USED_RAW_TARGET = 0.6
LIST_TARGET_SECONDS = 2.0
SEED = 21


def build_disk(path: Path, scratch: Path) -> None:
    rng = random.Random(SEED)
    with open(path, "wb") as out:
        write_stale(out, DISK_SIZE, rng)
    offsets, cursor = [], MiB
    for _, size, _ in PARTITIONS:
        offsets.append(cursor)
        cursor += size
    script = "label: gpt\n" + "".join(
        f"start={offset // SECTOR}, size={size // SECTOR}, "
        f"type={'lvm' if kind == 'lvm' else 'linux'}\n"
        for offset, (_, size, kind) in zip(offsets, PARTITIONS))
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script)
    for offset, (_, size, kind) in zip(offsets, PARTITIONS):
        if kind == "lvm":
            make_physical_volume(path, offset, size, GROUP, [ROOT, HOME], scratch)
            _filesystem(path, ROOT.offset(offset), ROOT.size, "ext4", rng)
            _filesystem(path, HOME.offset(offset), HOME.size, "xfs", rng)
        else:
            _filesystem(path, offset, size, kind, rng)


def _filesystem(disk: Path, offset: int, size: int, kind: str, rng: random.Random) -> None:
    with loop_device(disk, offset, size) as device:
        run([*MKFS[kind], device])
        with mounted(device) as root:
            fill_filesystem(root, rng)


def measure(workdir: Path) -> dict:
    """The runs of both backups and the Clonezilla pipeline, and the median seconds of each
    listing."""
    disk = workdir / "disk.img"
    build_disk(disk, workdir)
    bench = Bench(disk=disk, workdir=workdir, repo_root=REPO_ROOT, gzip_sample=0)
    partclone_on_original(bench)
    used = ours_backup(bench, "used", "ours: backup --mode used", workdir / "used-store",
                       "--mode", "used")
    raw = ours_backup(bench, "raw", "ours: backup --mode raw", workdir / "raw-store",
                      "--mode", "raw")
    failed = next((run for run in bench.runs.values() if run.error), None)
    if failed:
        raise RuntimeError(f"{failed.label}: {failed.error}")
    listing = {name: statistics.median(
        command_seconds(imaging_command("files", str(used.image), where, "/"), REPO_ROOT)
        for _ in range(ROUNDS)) for name, where in LISTED}
    return {"used": used, "raw": raw, "clonezilla": bench.runs["partclone.backup"],
            "listing": listing}


def report_lines(workdir: Path) -> list[str]:
    """The benchmark's lines for the report: each figure against its target, or why it failed."""
    storing = ("Layouts: `backup --mode used` of a 1.5 GiB disk with an LVM PV (ext4 and XFS "
               "volumes, 220 MiB of free extents), an XFS and a Btrfs partition, against "
               "Clonezilla's partclone per partition and per volume | zstd -T0 -3")
    listing = (f"Layouts: listing the root folder (`files`, from the command's start, median "
               f"of {ROUNDS})")
    figures, failed = measured([storing, listing], TOOLS, workdir, measure)
    if figures is None:
        return failed
    used, raw, clonezilla = figures["used"], figures["raw"], figures["clonezilla"]
    used_raw = used.output_bytes / raw.output_bytes
    slowest = max(figures["listing"].values())
    return [
        f"{storing}: {used.output_bytes / MiB:.0f} MiB in {used.seconds:.1f} s against "
        f"{clonezilla.output_bytes / MiB:.0f} MiB in {clonezilla.seconds:.1f} s (bytes "
        f"{used.output_bytes / clonezilla.output_bytes:.3f}, time "
        f"{used.seconds / clonezilla.seconds:.3f}); "
        f"`--mode raw` stores {raw.output_bytes / MiB:.0f} MiB in {raw.seconds:.1f} s, "
        f"used/raw {used_raw:.3f}, target ≤ {USED_RAW_TARGET:g}: "
        f"{'PASS' if used_raw <= USED_RAW_TARGET else 'FAIL'}",
        f"{listing}: " + ", ".join(f"{name} {seconds:.2f} s"
                                   for name, seconds in figures["listing"].items())
        + f"; target < {LIST_TARGET_SECONDS:g} s: "
        f"{'PASS' if slowest < LIST_TARGET_SECONDS else 'FAIL'}",
    ]


def main() -> None:
    run_alone("layouts", report_lines, sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
