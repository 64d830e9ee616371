"""Export: one standard zstd stream that plain `zstd -d` restores, split like `split` does."""
from __future__ import annotations

import os
import subprocess

import pytest
from engine import MiB, imaging, last_line, one_error_line, sha256_of
from support.disks import PartSpec, build_disk

from imaging.datastore import codec
from imaging.datastore.image import Image


def sh(command: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True)


@pytest.fixture(scope="module")
def imaged(tmp_path_factory):
    """A partitioned disk and its image in a datastore."""
    folder = tmp_path_factory.mktemp("export")
    disk = build_disk(folder / "disk.img", 24 * MiB, "dos",
                      [PartSpec(14 * MiB, "fat16"), PartSpec(4 * MiB, "raw-noise", gap_before=MiB)],
                      seed=5)
    result = imaging("backup", disk.path, "--store", folder / "store", "--disk", "sda")
    return disk, Image.open(last_line(result.stdout))


def test_split_export_restores_with_cat_and_plain_zstd(imaged, tmp_path):
    disk, image = imaged
    out = tmp_path / "sda.zst"
    result = imaging("export", image.path, out, "--split", "3m")
    files = result.stdout.split()
    parts = sorted(tmp_path.glob("sda.zst.a?"))
    assert len(parts) >= 2
    assert files == [str(p) for p in parts] + [str(out) + "-parts.sha256"]
    # Exactly the command the restore instructions give; every stage must succeed.
    restored = sh(f"set -o pipefail; cat {out}.* | zstd -d | cmp - {disk.path}", tmp_path)
    assert restored.returncode == 0, restored.stderr
    # The parts alone are one clean stream, and `split` would have cut it the same way.
    assert sh(f"cat {out}.a? | zstd -d -q -o joined.img", tmp_path).returncode == 0
    assert sha256_of(tmp_path / "joined.img") == sha256_of(disk.path)
    assert sh(f"cat {out}.a? | split -b 3m - ref. && for p in ref.*; do "
              f"cmp $p {out}.${{p#ref.}}; done", tmp_path).returncode == 0
    assert all(p.stat().st_size == 3 * MiB for p in parts[:-1])
    check = sh(f"sha256sum -c {out.name}-parts.sha256", tmp_path)
    assert check.returncode == 0 and check.stdout.count(b": OK") == len(parts)


def test_single_file_export_is_one_frame_with_size_and_checksum(imaged, tmp_path):
    disk, image = imaged
    out = tmp_path / "disk.zst"
    assert imaging("export", image.path, out, "--level", "1").stdout.split() == [
        str(out), str(out) + ".sha256"]
    listing = subprocess.run(["zstd", "-lv", out], capture_output=True, text=True, check=True).stdout
    assert "# Zstandard Frames: 1" in listing and "Check: XXH64" in listing
    assert f"({disk.size} B)" in listing  # the content size is in the frame header
    restored = subprocess.run(["zstd", "-dcq", out], capture_output=True, check=True).stdout
    assert restored == disk.path.read_bytes()
    assert (tmp_path / "disk.zst.sha256").read_text() == f"{sha256_of(out)}  disk.zst\n"


@pytest.mark.parametrize("level", ["3", "19"])  # 19: the optimal-parsing levels' own tuning
def test_long_distance_export_stays_within_plain_zstds_window(tmp_path, level):
    # Larger than the 128 MiB window, so the cap is what limits it; sparse and quick.
    disk = tmp_path / "big.img"
    with open(disk, "wb") as handle:
        handle.truncate(160 * MiB)
        for offset in (0, 150 * MiB):
            handle.seek(offset)
            handle.write(os.urandom(MiB))
    image = last_line(imaging("backup", disk, "--store", tmp_path / "store", "--disk", "big").stdout)
    out = tmp_path / "big.zst"
    imaging("export", image, out, "--long", "--level", level)
    listing = subprocess.run(["zstd", "-lv", out], capture_output=True, text=True, check=True).stdout
    assert "Window Size: 128 MiB" in listing, listing
    restored = sh(f"zstd -d < {out} | cmp - {disk}", tmp_path)
    assert restored.returncode == 0, restored.stderr


def test_a_long_run_of_noise_gets_a_frame_of_its_own(tmp_path):
    """A swap-like run of noise is not worth a slow level: its own fast frame,
    between frames of compressible data, and still one stream for plain zstd."""
    text = b"".join(b"line %d of a log that compresses well\n" % n for n in range(400_000))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.write(text[:16 * MiB])
        handle.write(os.urandom(40 * MiB))
        handle.write(text[-24 * MiB:])
    image = last_line(imaging("backup", disk, "--store", tmp_path / "store", "--disk", "d").stdout)
    out = tmp_path / "disk.zst"
    imaging("export", image, out, "--level", "9")
    listing = subprocess.run(["zstd", "-lv", out], capture_output=True, text=True, check=True).stdout
    assert "# Zstandard Frames: 3" in listing, listing
    restored = sh(f"zstd -d < {out} | cmp - {disk}", tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert 40 * MiB < out.stat().st_size < 41 * MiB


def test_a_corrupt_chunk_fails_the_export_and_leaves_no_file(imaged, tmp_path):
    _, image = imaged
    store = tmp_path / "store"
    subprocess.run(["cp", "-a", image.store.root, store], check=True)
    copy = Image.open(store / "images" / "sda" / image.stamp)
    victim = next(d for d in copy.index() if d != codec.zero_digest(copy.chunk_size))
    copy.store.chunk_path(victim).write_bytes(codec.compress(b"something else" * 1000))
    out = tmp_path / "out" / "sda.zst"
    out.parent.mkdir()
    line = one_error_line(imaging("export", copy.path, out, "--split", "1m", check=False))
    assert victim in line and "corrupt" in line
    assert list(out.parent.iterdir()) == []


def test_bad_input_is_one_clear_line_and_writes_nothing(imaged, tmp_path):
    _, image = imaged
    not_an_image = tmp_path / "empty"
    not_an_image.mkdir()
    taken = tmp_path / "taken.zst"
    (tmp_path / "taken.zst.aa").write_bytes(b"an older export")
    cases = [
        ([tmp_path / "nowhere", tmp_path / "a.zst"], "no such image directory"),
        ([not_an_image, tmp_path / "a.zst"], "not an image"),
        ([image.path, tmp_path / "a.zst", "--level", "0"], "level 0"),
        ([image.path, tmp_path / "a.zst", "--split", "2X"], "invalid size"),
        ([image.path, tmp_path / "a.zst", "--split", "0"], "invalid size"),
        ([image.path, taken], "taken.zst.aa already exists"),
        ([image.path, tmp_path / "no" / "dir.zst"], "no such directory"),
    ]
    for arguments, words in cases:
        line = one_error_line(imaging("export", *arguments, check=False))
        assert words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken.zst.aa"]
    assert (tmp_path / "taken.zst.aa").read_bytes() == b"an older export"
