"""Read errors on a real faulty disk: the backup goes on, maps bad sectors as ddrescue does."""
from __future__ import annotations

import json
import subprocess

import pytest
from engine import MiB, imaging, last_line, sha256_of, write_random
from support.devices import requires_root_loop_fuse
from support.faulty import ddrescue_bad_ranges, faulty_disk, round_out_to_sectors

from imaging.datastore import badmap
from imaging.datastore.image import Image

BAD_RANGES = [
    (5 * MiB + 1000, 10),            # a few bytes inside one sector
    (8 * MiB - 512, 1024),           # straddles the boundary of chunks 1 and 2
    (9 * MiB, 4096),                 # a whole page
    (20 * MiB + 3 * 512, 5 * 512),   # five sectors
    (32 * MiB - 512, 512),           # the very last sector
]


@pytest.fixture
def faulty(tmp_path):
    requires_root_loop_fuse()
    image = tmp_path / "healthy.img"
    write_random(image, 32 * MiB)
    with faulty_disk(image, BAD_RANGES, tmp_path) as device:
        yield image, device


def test_backup_survives_read_errors_and_maps_them_like_ddrescue(faulty, tmp_path):
    image, device = faulty
    result = imaging("backup", device, "--store", tmp_path / "store", "--disk", "faulty", "--json",
                     "--json-progress")
    summary = json.loads(last_line(result.stdout))
    expected_bad = round_out_to_sectors(BAD_RANGES)
    assert summary["status"] == "complete-with-read-errors"
    assert summary["bad_bytes"] == sum(size for _, size in expected_bad) == 17 * 512
    assert json.loads(result.stderr.splitlines()[-1])["bad_bytes"] == summary["bad_bytes"]

    ours = badmap.parse_bad((tmp_path / "store" / "images" / "faulty").glob("*/badblocks.map").__next__().read_text())
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    ddrescue = subprocess.run(["ddrescue", "-d", "-b", "512", device, rescue / "out.img", rescue / "out.map"],
                              capture_output=True, text=True)
    assert ddrescue.returncode == 0, ddrescue.stderr
    assert ours == ddrescue_bad_ranges(rescue / "out.map") == expected_bad

    manifest = Image.open(summary["image"]).manifest.as_dict()
    assert manifest["bad_bytes"] == summary["bad_bytes"]
    # The image holds every readable byte and zeros where the disk could not be read.
    expected = bytearray(image.read_bytes())
    for start, size in expected_bad:
        expected[start:start + size] = bytes(size)
    restored = tmp_path / "restored.img"
    imaging("restore", summary["image"], restored)
    assert restored.read_bytes() == bytes(expected)
    assert sha256_of(restored) == summary["sha256"]


def test_cli_says_how_much_was_unreadable(faulty, tmp_path):
    _, device = faulty
    result = imaging("backup", device, "--store", tmp_path / "store", "--disk", "faulty")
    assert "UNREADABLE 8.5 KiB (zero-filled, see badblocks.map)" in result.stdout
    assert "complete-with-read-errors" in imaging("list", "--store", tmp_path / "store").stdout
