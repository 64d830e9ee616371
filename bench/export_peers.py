"""Our export (`--level 19 --long`) against the classic recompression to 7z.

The classic workflow keeps `gzip -9` archives and later recompresses them with
`gunzip -c d.gz | 7za a -si d.7z`; ours takes an image and writes one standard
zstd stream. Compared: archive size (target: within 1% of 7z's or smaller),
compression time (target: no longer; only the 7za step is timed, the gzip
archive being what the classic workflow starts from) and decompression speed
(target: at least 10x faster than 7za x).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

from bench.peers import Bench, Run, _imaging, _pipeline
from bench.system import MiB, same_content, tree_bytes
from bench.system import run as run_command

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_TARGET = 1.01  # ours / 7z
DECOMPRESSION_TARGET = 10.0  # 7z seconds / ours


def run(disk_path: Path, workdir: Path, image: Optional[Path] = None) -> list[Run]:
    """Measure on `disk_path`, working in `workdir`; `image` skips our backup step."""
    bench = Bench(disk=Path(disk_path), workdir=Path(workdir), repo_root=REPO_ROOT, gzip_sample=0)
    if image is None:
        store = bench.path("export-store")
        backup = bench.measure(
            "export.backup", "ours: backup (zstd level 3) to take the image",
            _imaging("backup", str(bench.disk), "--store", str(store), "--disk", "bench", "--json"),
            inputs=[bench.disk], cwd=REPO_ROOT)
        if backup.error:
            return list(bench.runs.values())
        image = Path(json.loads(backup.stdout.strip().splitlines()[-1])["image"])
        backup.output_bytes = tree_bytes(store / "chunks")

    exported = bench.path("export.zst")
    ours = bench.measure(
        "export.ours", "ours: export --level 19 --long",
        _imaging("export", str(image), str(exported), "--level", "19", "--long", "--quiet"),
        inputs=[image.parent.parent.parent / "chunks"], cwd=REPO_ROOT)
    gz, sevenzip = bench.path("d.gz"), bench.path("d.7z")
    run_command(_pipeline(f"gzip -9 -c {shlex.quote(str(bench.disk))} > {shlex.quote(str(gz))}"))
    classic = bench.measure(
        "export.7za", "classic: gunzip -c d.gz | 7za a -si d.7z",
        _pipeline(f"gunzip -c {shlex.quote(str(gz))} | 7za a -si {shlex.quote(str(sevenzip))} "
                  "> /dev/null"), inputs=[gz])
    if ours.error or classic.error:
        return list(bench.runs.values())
    ours.output_bytes = exported.stat().st_size
    classic.output_bytes = sevenzip.stat().st_size
    restored = bench.path("export-restored.img")
    run_command(["zstd", "-dqf", str(exported), "-o", str(restored)])
    ours.identical = same_content(restored, bench.disk)
    restored.unlink()
    ours.note = (f"{ours.output_bytes / classic.output_bytes:.3f}x 7z's size "
                 f"(target <= {SIZE_TARGET}), {ours.seconds / classic.seconds:.2f}x its time "
                 "(target <= 1)")

    ours_decode = bench.measure("export.ours_decode", "ours: zstd -dc export > /dev/null",
                                ["zstd", "-dc", str(exported)], inputs=[exported],
                                stdout=Path("/dev/null"))
    classic_decode = bench.measure("export.7za_decode", "classic: 7za x -so d.7z > /dev/null",
                                   ["7za", "x", "-so", str(sevenzip)], inputs=[sevenzip],
                                   stdout=Path("/dev/null"))
    if not (ours_decode.error or classic_decode.error):
        ours_decode.note = (f"{classic_decode.seconds / ours_decode.seconds:.1f}x faster than "
                            f"7za x (target >= {DECOMPRESSION_TARGET:.0f}x)")
    return list(bench.runs.values())


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
