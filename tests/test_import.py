"""Import of classic backups made with the real tools: dd | gzip -9 | split, 7z, xz, zstd, raw."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from engine import REPO, MiB, imaging, last_line, one_error_line, sha256_of
from support.disks import PartSpec, build_disk

from imaging.datastore import codec
from imaging.datastore.image import Image


def sh(command: str, cwd) -> None:
    subprocess.run(["sh", "-ec", command], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    """A partitioned disk and its classic backups, made the way the old HOWTO makes them."""
    folder = tmp_path_factory.mktemp("classic")
    disk = build_disk(folder / "disk.img", 16 * MiB, "dos",
                      [PartSpec(10 * MiB, "fat16"), PartSpec(3 * MiB, "raw-noise", gap_before=MiB)],
                      seed=3)
    sh("sfdisk -d disk.img > sda.sf"
       " && dd if=disk.img of=sda.mbr bs=512 count=1 status=none"
       " && dd if=disk.img bs=1024 conv=noerror,sync status=none | gzip -9 | split -b 2m - sda.gz."
       " && cat sda.gz.a? > whole.gz"
       " && dd if=disk.img status=none | 7za a -si sda.7z > /dev/null"
       " && split -b 3m sda.7z sda.7z."
       " && xz -2 -c disk.img > misnamed.img"  # content decides, not the name
       " && zstd -q -c disk.img > sda.zst"
       " && cp disk.img sda.gz", folder)  # a raw image, whatever its name says
    return disk, folder


def import_files(*files, store, disk_id="sda"):
    result = imaging("import", *files, "--store", store, "--disk", disk_id)
    return Image.open(last_line(result.stdout))


def test_split_gzip_parts_by_glob_restore_byte_identical(classic, tmp_path):
    disk, folder = classic
    store = tmp_path / "store"
    # Exactly as a user types it: the shell's glob names the parts.
    result = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m imaging import {folder}/sda.gz.a* '
                     f'--store {store} --disk sda'],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    image = Image.open(last_line(result.stdout))
    manifest = image.manifest.as_dict()
    assert manifest["sha256"] == sha256_of(disk.path)
    assert manifest["size"] == disk.size and manifest["sector_size"] == 512
    assert manifest["status"] == "complete" and manifest["bad_bytes"] == 0
    assert manifest["mode"] == "raw"
    for key in ("format", "chunk_size", "created", "seconds", "level", "stored_bytes", "new_bytes"):
        assert key in manifest, key
    identity = manifest["disk"]
    assert identity["id"] == "sda" and identity["source"] == "import"
    assert identity["files"] == [str(p) for p in sorted(folder.glob("sda.gz.a?"))]
    assert len(identity["files"]) >= 3
    assert (image.path / "layout.sf").read_text() == (folder / "sda.sf").read_text()
    assert (image.path / "mbr.bin").read_bytes() == (folder / "sda.mbr").read_bytes()
    badmap = (image.path / "badblocks.map").read_text()
    assert "-" not in "".join(line.split()[2] for line in badmap.splitlines()[3:] if line[0] != "#")
    target = tmp_path / "restored.img"
    imaging("restore", image.path, target)
    assert sha256_of(target) == sha256_of(disk.path)
    subprocess.run(["cmp", target, disk.path], check=True)
    # The imported image's own recipe restores it with stock tools too.
    by_recipe = tmp_path / "by-recipe.img"
    sh(f"sh {image.path / 'RESTORE.txt'} {by_recipe}", tmp_path)
    assert sha256_of(by_recipe) == sha256_of(disk.path)


def test_every_format_is_detected_by_content_and_deduplicated(classic, tmp_path):
    disk, folder = classic
    store = tmp_path / "store"
    parts_7z = sorted(folder.glob("sda.7z.a?"))
    assert len(parts_7z) >= 2
    random.Random(1).shuffle(parts_7z)
    first = import_files(folder / "whole.gz", store=store)
    assert first.manifest.disk["archive_format"] == "gzip"
    for files, expected in ([[folder / "sda.7z"], "7z"], [parts_7z, "7z"],
                            [[folder / "misnamed.img"], "xz"], [[folder / "sda.zst"], "zstd"],
                            [[folder / "sda.gz"], "raw"]):
        image = import_files(*files, store=store)
        assert image.manifest.disk["archive_format"] == expected, files
        assert image.manifest.sha256 == first.manifest.sha256 == sha256_of(disk.path)
        assert image.index() == first.index()
        assert image.manifest.new_bytes == 0, "the same disk again stores nothing new"
        # sda.sf is found beside sda.7z.aa, sda.zst, ...; nothing is named like misnamed.img.
        assert (image.path / "layout.sf").exists() == files[0].name.startswith("sda")
    verified = imaging("verify", image.path)
    assert "intact" in verified.stdout


def test_without_files_beside_it_the_boot_sector_comes_from_the_data(classic, tmp_path):
    disk, folder = classic
    lonely = tmp_path / "backup.bin"
    lonely.write_bytes((folder / "sda.zst").read_bytes())
    image = import_files(lonely, store=tmp_path / "store")
    assert (image.path / "mbr.bin").read_bytes() == disk.path.read_bytes()[:512]
    assert not (image.path / "layout.sf").exists()
    assert image.manifest.disk["layout_file"] is None


def assert_failed_without_leftovers(result, store, *words):
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    images = store / "images" / "sda"
    assert not images.exists() or not any(images.iterdir()), list(images.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("archive", ["whole.gz", "sda.7z", "misnamed.img", "sda.zst"])
def test_truncated_or_corrupt_archive_fails_and_leaves_no_image(classic, tmp_path, archive, damage):
    _, folder = classic
    data = bytearray((folder / archive).read_bytes())
    if damage == "truncate":
        del data[len(data) * 2 // 3:]
    else:
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    broken = tmp_path / archive
    broken.write_bytes(bytes(data))
    store = tmp_path / "store"
    result = imaging("import", broken, "--store", store, "--disk", "sda", check=False)
    assert_failed_without_leftovers(result, store, str(broken))


def test_a_missing_or_extra_part_is_refused(classic, tmp_path):
    _, folder = classic
    store = tmp_path / "store"
    gap = imaging("import", folder / "sda.gz.aa", folder / "sda.gz.ac", "--store", store,
                  "--disk", "sda", check=False)
    assert_failed_without_leftovers(gap, store, "sda.gz.ab is missing")
    short = imaging("import", folder / "sda.gz.aa", folder / "sda.gz.ab", "--store", store,
                    "--disk", "sda", check=False)
    assert_failed_without_leftovers(short, store, "sda.gz.ac exists too")
    first_only = imaging("import", folder / "sda.gz.aa", "--store", store, "--disk", "sda",
                         check=False)
    assert_failed_without_leftovers(first_only, store, "sda.gz.ab exists too")


def test_bad_input_is_one_clear_line(classic, tmp_path):
    _, folder = classic
    store = tmp_path / "store"
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n")
    bzipped = tmp_path / "disk.img"
    bzipped.write_bytes(subprocess.run(["bzip2", "-c", text], capture_output=True,
                                       check=True).stdout)
    cases = [
        ([tmp_path / "missing.gz"], "no such file"),
        ([text], "unknown format"),
        ([bzipped], "bzip2"),
        ([folder / "whole.gz", "--level", "23"], "level 23"),
    ]
    for arguments, words in cases:
        result = imaging("import", *arguments, "--store", store, "--disk", "sda", check=False)
        assert_failed_without_leftovers(result, store, words)


def test_json_progress_reports_the_disk_bytes(classic, tmp_path):
    disk, folder = classic
    result = imaging("import", folder / "whole.gz", "--store", tmp_path / "store", "--disk", "sda",
                     "--json-progress")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert events[-1]["finished"] and events[-1]["phase"] == "import"
    assert events[-1]["done"] == events[-1]["total"] == disk.size
    assert codec.DEFAULT_LEVEL == Image.open(last_line(result.stdout)).manifest.level
