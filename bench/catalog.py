"""Listing a large datastore through the catalog: 10,000 images in under 5 s.

A real small backup and its verification give one real manifest.json and
verify.json; copies of them fill 10,000 image directories over 20 disks (every
other image verified), and `imaging.datastore.catalog.list_images` lists them all, timed
as the median of 3 runs with a warm page cache. The images' chunks are not
copied: listing reads manifests and verification records only.
`python -m bench.catalog [WORKDIR]` runs it alone.
"""

import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from imaging.backup import backup
from imaging.base.errors import ImagingError
from imaging.datastore.catalog import list_images
from imaging.datastore.image import stamp_of
from imaging.datastore.manifest import NAME as MANIFEST_NAME
from imaging.datastore.verification import RECORD_NAME
from imaging.verify import verify

IMAGES = 10_000
DISKS = 20
ROUNDS = 3
TARGET_SECONDS = 5.0
SOURCE_SIZE = 8 * 1024 * 1024
FIRST_STAMP = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def build_datastore(workdir: Path, images: int = IMAGES, disks: int = DISKS) -> Path:
    """A datastore of `images` image directories, copies of one real image's records."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "disk.img"
    source.write_bytes(os.urandom(SOURCE_SIZE))
    store = workdir / "store"
    original = backup(str(source), store, disk_id="original").image
    verify(original)
    manifest = (original / MANIFEST_NAME).read_bytes()
    record = (original / RECORD_NAME).read_bytes()
    shutil.rmtree(original.parent)
    source.unlink()
    for number in range(images):
        moment = FIRST_STAMP + datetime.timedelta(hours=number // disks)
        image = store / "images" / f"disk-{number % disks:02d}" / stamp_of(moment)
        image.mkdir(parents=True)
        (image / MANIFEST_NAME).write_bytes(manifest)
        if number % 2:
            (image / RECORD_NAME).write_bytes(record)
    return store


def measure(workdir: Path) -> float:
    """Median seconds of listing the 10,000 images; raises if the listing is wrong."""
    store = build_datastore(workdir)
    timings = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        records = list_images(store)
        timings.append(time.perf_counter() - started)
        problems = [record.error for record in records if record.error]
        if len(records) != IMAGES or problems:
            raise RuntimeError(f"listed {len(records)} of {IMAGES} images"
                               + (f"; first problem: {problems[0]}" if problems else ""))
    return statistics.median(timings)


def report_line(workdir: Path) -> str:
    """The benchmark's line for the report: the time against the target, or why it failed."""
    criterion = f"Catalog: listing {IMAGES:,} images (`list_images`, median of {ROUNDS})"
    try:
        seconds = measure(workdir)
    except (ImagingError, OSError, RuntimeError) as failure:
        return f"{criterion}: FAIL ({failure})"
    verdict = "PASS" if seconds < TARGET_SECONDS else "FAIL"
    return f"{criterion}: {seconds:.2f} s, target < {TARGET_SECONDS:g} s: {verdict}"


def main() -> None:
    parent = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="catalog-", dir=parent) as workdir:
        print(report_line(Path(workdir)))


if __name__ == "__main__":
    main()
