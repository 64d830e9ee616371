"""Our export (`--level 19 --long`) against the classic recompression to 7z.

The classic workflow keeps `gzip -9` archives and later recompresses them with
`gunzip -c d.gz | 7za a -si d.7z`; ours takes an image and writes one standard
zstd stream. Compared: archive size (target: within 1% of 7z's or smaller),
compression time (target: no longer; only the 7za step is timed, the gzip
archive being what the classic workflow starts from) and decompression speed
(target: at least 10x faster than 7za x).

The "export" section of `python -m bench` (off by default: ~11 min on 1 GiB);
`python -m bench.export_peers DISK` runs it alone.
"""
import shlex
from pathlib import Path

from bench.peers import Bench, Peer, Run, imaging_command, merge_rounds, ours_backup, pipeline
from bench.report import DECOMPRESSION_TARGET, EXPORT_SIZE_TARGET, EXPORT_TIME_TARGET
from bench.system import MiB, same_content
from bench.system import run as run_command

REPO_ROOT = Path(__file__).resolve().parent.parent
DECODE_ROUNDS = 3


def export_on_original(bench: Bench) -> None:
    """The "export" section of `python -m bench`: exports the image of the
    round's first backup when the ours peer made one, else takes its own."""
    first = bench.runs.get("ours.first")
    _measure(bench, first.image if first is not None and not first.error else None)


def run(disk_path: Path, workdir: Path, image: Path | None = None) -> list[Run]:
    """Measure on `disk_path`, working in `workdir`; `image` skips our backup step."""
    bench = Bench(disk=Path(disk_path), workdir=Path(workdir), repo_root=REPO_ROOT, gzip_sample=0)
    _measure(bench, image)
    return list(bench.runs.values())


def _measure(bench: Bench, image: Path | None) -> None:
    if image is None:
        backup = ours_backup(bench, "export.backup",
                             "ours: backup (zstd level 3) to take the image",
                             bench.path("export-store"))
        if backup.error:
            return
        image = backup.image

    exported = bench.path("export.zst")
    ours = bench.measure(
        "export.ours", "ours: export --level 19 --long",
        imaging_command("export", str(image), str(exported), "--level", "19", "--long",
                        "--quiet"),
        inputs=[image.parent.parent.parent / "chunks"], cwd=bench.repo_root)
    gz, sevenzip = bench.path("d.gz"), bench.path("d.7z")
    classic_label = "classic: gunzip -c d.gz | 7za a -si d.7z"
    try:  # the archive the classic workflow starts from: made, not timed
        run_command(pipeline(f"gzip -9 -c {shlex.quote(str(bench.disk))} "
                             f"> {shlex.quote(str(gz))}"))
    except RuntimeError as failure:
        classic = bench.fail("export.7za", classic_label, str(failure))
    else:
        classic = bench.measure(
            "export.7za", classic_label,
            pipeline(f"gunzip -c {shlex.quote(str(gz))} | 7za a -si {shlex.quote(str(sevenzip))} "
                     "> /dev/null"), inputs=[gz])
    if ours.error or classic.error:
        return
    ours.output_bytes = exported.stat().st_size
    classic.output_bytes = sevenzip.stat().st_size
    restored = bench.path("export-restored.img")
    run_command(["zstd", "-dqf", str(exported), "-o", str(restored)])
    ours.identical = same_content(restored, bench.disk)
    restored.unlink()
    ours.note = (f"{ours.output_bytes / classic.output_bytes:.3f}x 7z's size "
                 f"(target <= {EXPORT_SIZE_TARGET}), {ours.seconds / classic.seconds:.3f}x its "
                 f"time (target <= {EXPORT_TIME_TARGET:g})")

    ours_decode = _median_of(DECODE_ROUNDS, bench, "export.ours_decode",
                             "ours: zstd -dc export > /dev/null", ["zstd", "-dc", str(exported)],
                             inputs=[exported], stdout=Path("/dev/null"))
    classic_decode = _median_of(DECODE_ROUNDS, bench, "export.7za_decode",
                                "classic: 7za x -so d.7z > /dev/null",
                                ["7za", "x", "-so", str(sevenzip)], inputs=[sevenzip],
                                stdout=Path("/dev/null"))
    if not (ours_decode.error or classic_decode.error):
        ours_decode.note = (f"{classic_decode.seconds / ours_decode.seconds:.3f}x faster than "
                            f"7za x (target >= {DECOMPRESSION_TARGET:.0f}x)")


def _median_of(times: int, bench: Bench, key: str, label: str, argv: list[str],
               **options) -> Run:
    """A run measured `times` times in a row, its median standing for all:
    decoding takes seconds, so one sample is at the mercy of the machine's noise."""
    samples = []
    for _ in range(times):
        samples.append({key: bench.measure(key, label, argv, **options)})
        if samples[-1][key].error:
            break
    bench.runs[key] = merge_rounds(samples)[key]
    return bench.runs[key]


# ~11 min for 1 GiB on 2 cores (export -19 --long ~5 min, the untimed gzip -9
# ~2 min, gunzip | 7za ~3.5 min): off by default.
PEER = Peer("export", ["zstd", "gzip", "7za"], export_on_original, default=False, repeat=False)


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.export_peers", description=__doc__)
    parser.add_argument("disk", type=Path)
    parser.add_argument("--image", type=Path, help="an existing image of the disk")
    arguments = parser.parse_args()
    scratch = REPO_ROOT / "data" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-peers-", dir=scratch) as folder:
        for row in run(arguments.disk, Path(folder), arguments.image):
            size = f"{row.output_bytes / MiB:8.1f} MiB" if row.output_bytes else " " * 12
            seconds = f"{row.seconds:7.1f} s" if row.seconds is not None else " " * 9
            print(f"{row.label:<48} {seconds} {size}  {row.error or row.note}")
