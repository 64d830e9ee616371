"""Backup and restore of whole disks: byte identity, dedup, layout, manifest."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from engine import MiB, imaging, last_line, sha256_of
from support.devices import loop_device, mounted, requires_loop
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.datastore import codec
from imaging.datastore.image import Image

pytestmark = pytest.mark.usefixtures("loop_available")


@pytest.fixture
def loop_available():
    requires_loop()


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disk")
    return build_disk(folder / "disk.img", 64 * MiB, "dos",
                      [PartSpec(40 * MiB, "ext4"), PartSpec(8 * MiB, "swap", gap_before=2 * MiB)])


def test_backup_of_a_loop_device_restores_byte_identical_and_fsck_clean(disk, tmp_path):
    store = tmp_path / "store"
    target_file = tmp_path / "target.img"
    target_file.write_bytes(b"")
    os.truncate(target_file, disk.size + 8 * MiB)  # a larger disk is a valid target
    with loop_device(disk.path, read_only=True) as source:
        result = imaging("backup", source, "--store", store, "--disk", "disk-a", "--json")
        summary = json.loads(last_line(result.stdout))
        with loop_device(target_file) as target:
            restored = imaging("restore", summary["image"], target)
            assert restored.stdout.rstrip().endswith("verified: every chunk matches")
    assert summary["sha256"] == sha256_of(disk.path)
    assert summary["size"] == disk.size
    assert sha256_of(target_file, disk.size) == sha256_of(disk.path)
    ext4 = disk.partitions[0]
    with loop_device(target_file, ext4.start, ext4.size, read_only=True) as part:
        fsck = subprocess.run(["e2fsck", "-fn", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(part, tmp_path / "mnt", read_only=True) as mountpoint:
            assert any(mountpoint.rglob("*.py")), "restored filesystem has its files"


def test_image_directory_holds_what_the_design_names(disk, tmp_path):
    result = backup(str(disk.path), tmp_path / "store", disk_id="disk-a")
    image = Image.open(result.image)
    names = {p.name for p in result.image.iterdir()}
    assert names == {"index", "manifest.json", "layout.sf", "mbr.bin", "badblocks.map", "RESTORE.txt"}
    manifest = image.manifest.as_dict()
    for key in ("format", "disk", "size", "chunk_size", "sector_size", "sha256", "created",
                "seconds", "level", "stored_bytes", "new_bytes", "bad_bytes", "mode", "status"):
        assert key in manifest, key
    assert manifest["status"] == "complete" and manifest["bad_bytes"] == 0
    assert manifest["disk"]["id"] == "disk-a" and manifest["disk"]["size"] == disk.size
    assert (result.image / "mbr.bin").read_bytes() == disk.path.read_bytes()[:512]
    dump = subprocess.run(["sfdisk", "--dump", disk.path], capture_output=True, text=True, check=True)
    assert (result.image / "layout.sf").read_text() == dump.stdout
    index = image.index()
    assert len(index) == disk.size // (4 * MiB)
    # Each chunk is a standard zstd frame whose content hashes to its name.
    data = disk.path.read_bytes()
    for position, digest in enumerate(index):
        chunk = data[position * 4 * MiB:(position + 1) * 4 * MiB]
        assert hashlib.sha256(chunk).hexdigest() == digest
    sample = next(d for d in index if d != codec.zero_digest(4 * MiB))
    chunk_file = image.store.chunk_path(sample)
    decoded = subprocess.run(["zstd", "-dc", chunk_file], capture_output=True, check=True).stdout
    assert hashlib.sha256(decoded).hexdigest() == sample
    assert manifest["stored_bytes"] == sum(image.store.chunk_path(d).stat().st_size for d in set(index))


def test_second_backup_stores_only_the_changed_chunk_and_compresses_nothing_else(disk, tmp_path, monkeypatch):
    copy = tmp_path / "copy.img"
    copy.write_bytes(disk.path.read_bytes())
    store = tmp_path / "store"
    first = backup(str(copy), store, disk_id="d")
    chunk_files_before = set(store.glob("chunks/*/*.zst"))
    with open(copy, "r+b") as handle:  # change one byte in the 10th chunk
        handle.seek(9 * 4 * MiB + 12345)
        old = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([old[0] ^ 0xFF]))
    compressed = []
    real_compress = codec.compress
    monkeypatch.setattr(codec, "compress", lambda buf, level=3: compressed.append(1) or real_compress(buf, level))
    second = backup(str(copy), store, disk_id="d")
    new_files = set(store.glob("chunks/*/*.zst")) - chunk_files_before
    assert len(new_files) == 1 and len(compressed) == 1
    assert second.new_bytes == next(iter(new_files)).stat().st_size
    assert first.new_bytes > 100 * second.new_bytes
    assert first.image != second.image and second.sha256 == sha256_of(copy)
    first_index = Image.open(first.image).index()
    second_index = Image.open(second.image).index()
    assert [i for i, (a, b) in enumerate(zip(first_index, second_index)) if a != b] == [9]


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_layout_prints_what_sfdisk_dump_prints(label, tmp_path):
    built = build_disk(tmp_path / "d.img", 32 * MiB, label,
                       [PartSpec(8 * MiB, "raw-noise"), PartSpec(8 * MiB, "swap")])
    with loop_device(built.path, read_only=True) as device:
        ours = imaging("layout", device).stdout
        theirs = subprocess.run(["sfdisk", "--dump", device], capture_output=True, text=True, check=True).stdout
    assert ours == theirs and f"label: {label}" in ours


def test_restore_to_a_file_leaves_holes_for_zero_chunks(tmp_path):
    source = tmp_path / "sparse.img"
    with open(source, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(20 * MiB)
        handle.write(os.urandom(MiB))
    result = backup(str(source), tmp_path / "store", disk_id="sparse")
    target = tmp_path / "restored.img"
    imaging("restore", result.image, target)
    assert sha256_of(target) == sha256_of(source)
    assert target.stat().st_blocks * 512 <= 4 * MiB  # one non-zero chunk allocated


def test_restore_recipe_runs_with_shell_zstd_and_dd_only(disk, tmp_path):
    result = backup(str(disk.path), tmp_path / "store", disk_id="disk-a")
    target = tmp_path / "by-recipe.img"
    recipe = result.image / "RESTORE.txt"
    command = next(line.strip("# ").strip() for line in recipe.read_text().splitlines()
                   if line.strip("# ").startswith("sh ") and "RESTORE.txt" in line)
    run = subprocess.run(command.replace("/dev/sdX", str(target)), shell=True, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sha256_of(target) == sha256_of(disk.path)


def test_list_shows_images_per_disk(disk, tmp_path):
    store = tmp_path / "store"
    backup(str(disk.path), store, disk_id="alpha")
    backup(str(disk.path), store, disk_id="beta")
    listing = imaging("list", "--store", store).stdout.splitlines()
    assert listing[0].split()[:2] == ["DISK", "IMAGE"]
    assert [line.split()[0] for line in listing[1:]] == ["alpha", "beta"]
    assert all(line.split()[-1] == "complete" for line in listing[1:])
