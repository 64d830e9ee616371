"""Encrypted datastores: what an image's files and chunks reveal without the key, restore
with the engine and with stock tools, tampering and wrong keys refused in one line, and the
work done without the key (listing, sync, prune, gc)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from engine import MiB, imaging, last_line, one_error_line, sha256_of, text_like
from support.devices import requires_root_loop_fuse
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)
from test_delta_chunks import CHUNK, edited

from imaging.datastore import keyring, keys
from imaging.datastore.image import Image
from imaging.datastore.sealing import MAGIC
from imaging.datastore.store import Datastore

# A line of text the disk holds many times over: no file of the store may show it.
MARKER = b"the quick brown fox owns this disk "


@pytest.fixture(autouse=True)
def no_key_held():
    """Each test gives its keys itself (through --key or IMAGING_KEY_FILE)."""
    keyring.forget()
    yield
    keyring.forget()


def disk_bytes(seed: int) -> bytearray:
    data = text_like(4 * CHUNK, seed=seed)
    data[CHUNK:CHUNK + 64 * len(MARKER)] = MARKER * 64
    data[3 * CHUNK:] = bytes(CHUNK)  # a chunk of zeros: stored, and named by the key too
    return data


@pytest.fixture
def encrypted(tmp_path):
    """(store, key file, disk): disk d backed up twice into a store encrypted with the key
    (the second image holds delta chunks)."""
    key_file = tmp_path / "store.key"
    keys.create(key_file)
    disk = tmp_path / "d.img"
    data = disk_bytes(seed=1)
    disk.write_bytes(data)
    store = tmp_path / "store"
    imaging("backup", disk, "--store", store, "--disk", "d", "--key", key_file, "-q")
    disk.write_bytes(edited(data, seed=2))
    imaging("backup", disk, "--store", store, "--disk", "d", "-q",
            env={**os.environ, "IMAGING_KEY_FILE": str(key_file)})
    return store, key_file, disk


def images_of(store: Path) -> list[Path]:
    return Datastore.open(store).image_dirs("d")


def key_line(key_file: Path) -> str:
    return last_line(imaging("key", "show", key_file).stdout)


def test_nothing_stored_shows_the_disk_or_names_a_chunk_by_its_content(encrypted):
    store, key_file, disk = encrypted
    settings = json.loads((store / "datastore.json").read_text())
    assert settings == {"format": 3, "chunk_size": CHUNK,
                        "key": keys.fingerprint_of(key_file)}
    contents = disk_bytes(seed=1)
    plain_names = {hashlib.sha256(contents[i:i + CHUNK]).hexdigest()
                   for i in range(0, len(contents), CHUNK)}
    chunk_names = {path.name.removesuffix(".zst") for path in (store / "chunks").rglob("*.zst")}
    assert len(chunk_names) >= 4 and not chunk_names & plain_names
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert MARKER[:16] not in data, path
            assert b"d.img" not in data or path.name == "RESTORE.txt", path
    image = images_of(store)[-1]
    summary = json.loads((image / "summary.json").read_text())
    assert set(summary) == {"size", "chunk_size", "chunks", "created", "seconds", "level", "mode",
                            "status", "stored_bytes", "new_bytes", "bad_bytes"}
    for sealed in ("manifest.json", "index", "mbr.bin", "badblocks.map"):
        assert (image / sealed).read_bytes().startswith(MAGIC), sealed


def test_restore_is_byte_identical_and_listing_needs_no_key(encrypted, tmp_path):
    store, key_file, disk = encrypted
    listed = json.loads(imaging("list", "--store", store, "--json").stdout)
    assert [(record["encrypted"], record["size"], record["sha256"]) for record in listed] == \
        [(True, 4 * CHUNK, None)] * 2
    with_key = json.loads(imaging("list", "--store", store, "--json", "--key", key_file).stdout)
    assert with_key[-1]["sha256"] == sha256_of(disk)
    imaging("restore", images_of(store)[-1], tmp_path / "out.img", "--key", key_file)
    assert sha256_of(tmp_path / "out.img") == sha256_of(disk)
    verified = imaging("verify", images_of(store)[0], "--key", key_file).stdout
    assert "intact" in verified


def test_without_the_key_or_with_another_each_verb_says_which_key_in_one_line(encrypted,
                                                                           tmp_path):
    store, key_file, _ = encrypted
    fingerprint = keys.fingerprint_of(key_file)
    image = images_of(store)[-1]
    for verb in (["restore", image, tmp_path / "out.img"], ["verify", image],
                 ["export", image, tmp_path / "out.zst"], ["files", image, "1"]):
        line = one_error_line(imaging(*verb, check=False,
                                      env={**os.environ, "IMAGING_KEY_FILE": ""}))
        assert line == (f"imaging: error: {store} is encrypted with key {fingerprint}: give its "
                        "key file with --key FILE or IMAGING_KEY_FILE"), verb
    assert not (tmp_path / "out.img").exists() and not (tmp_path / "out.zst").exists()
    other = tmp_path / "other.key"
    keys.create(other)
    line = one_error_line(imaging("restore", image, tmp_path / "out.img", "--key", other,
                                  check=False))
    assert line.endswith(f"the key given is {keys.fingerprint_of(other)}")
    protected = tmp_path / "protected.key"
    keys.save(protected, keys.load(key_file), "right horse")
    line = one_error_line(imaging("verify", image, "--key", protected, check=False,
                                  env={**os.environ, "IMAGING_PASSPHRASE": "wrong horse"}))
    assert line == f"imaging: error: wrong passphrase for key file {protected}"
    assert "intact" in imaging("verify", image, "--key", protected,
                               env={**os.environ, "IMAGING_PASSPHRASE": "right horse"}).stdout


def test_a_backup_with_a_key_into_a_plain_store_is_refused(tmp_path):
    key_file = tmp_path / "k.key"
    keys.create(key_file)
    disk = tmp_path / "d.img"
    disk.write_bytes(text_like(CHUNK, seed=3))
    imaging("backup", disk, "--store", tmp_path / "plain", "-q")
    line = one_error_line(imaging("backup", disk, "--store", tmp_path / "plain", "--key",
                                  key_file, check=False))
    assert line == (f"imaging: error: {tmp_path / 'plain'} is not encrypted: leave the key out, "
                    "or name a new datastore to encrypt")
    assert len(Datastore.open(tmp_path / "plain").image_dirs()) == 1


def chunk_file(store: Path, position: int, image: Path, key_file: Path) -> Path:
    keyring.load(key_file)
    name = Image.open(image).index()[position]
    keyring.forget()
    return store / "chunks" / name[:2] / f"{name}.zst"


@pytest.mark.parametrize("tamper", ["flipped byte in a chunk", "chunk swapped for another",
                                    "edited index", "index of another image", "edited manifest"])
def test_tampering_is_refused_by_restore_and_verify_in_one_line(encrypted, tmp_path, tamper):
    store, key_file, _ = encrypted
    older, newer = images_of(store)
    first, second = (chunk_file(store, position, newer, key_file) for position in (0, 2))
    if tamper == "flipped byte in a chunk":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x20
        first.write_bytes(bytes(data))
        expected = f"chunk {first.name.removesuffix('.zst')}: fails its check"
    elif tamper == "chunk swapped for another":
        shutil.copyfile(second, first)
        expected = f"chunk {first.name.removesuffix('.zst')}: fails its check"
    elif tamper == "edited index":
        data = bytearray((newer / "index").read_bytes())
        data[30] ^= 0x01
        (newer / "index").write_bytes(bytes(data))
        expected = f"index images/d/{newer.name}: fails its check"
    elif tamper == "index of another image":
        shutil.copyfile(older / "index", newer / "index")
        expected = f"index images/d/{newer.name}: fails its check"
    else:
        data = bytearray((newer / "manifest.json").read_bytes())
        data[-40] ^= 0x01
        (newer / "manifest.json").write_bytes(bytes(data))
        expected = f"manifest.json images/d/{newer.name}: fails its check"
    target = tmp_path / "out.img"
    line = one_error_line(imaging("restore", newer, target, "--key", key_file, check=False))
    assert expected in line and "changed, moved or sealed under another key" in line, line
    result = imaging("verify", newer, "--key", key_file, check=False)
    assert result.returncode == 1 and expected in result.stdout + result.stderr


def test_restore_txt_restores_with_stock_tools_and_stops_at_a_tampered_chunk(encrypted,
                                                                            tmp_path):
    store, key_file, disk = encrypted
    image = images_of(store)[-1]
    target = tmp_path / "by-script.img"
    target.touch()
    line = key_line(key_file)
    done = subprocess.run(["sh", image / "RESTORE.txt", target], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "IMAGING_KEY": line})
    assert done.returncode == 0, done.stderr
    assert sha256_of(target) == sha256_of(disk)
    wrong = subprocess.run(["sh", image / "RESTORE.txt", tmp_path / "x.img"],
                           capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"],
                                "IMAGING_KEY": keys.generate().text()})
    assert wrong.returncode == 2 and f"not {keys.fingerprint_of(key_file)}" in wrong.stderr
    flipped = chunk_file(store, 1, image, key_file)
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(bytes(data))
    stopped = subprocess.run(["sh", image / "RESTORE.txt", tmp_path / "y.img"],
                             capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "IMAGING_KEY": line})
    assert stopped.returncode == 3
    assert f"chunk {flipped.name.removesuffix('.zst')}: fails its check" in stopped.stderr
    assert (tmp_path / "y.img").stat().st_size == CHUNK  # chunk 0 only: nothing past the fault


def test_a_copy_made_prune_and_collected_without_the_key_restores(encrypted, tmp_path):
    store, key_file, disk = encrypted
    copy = tmp_path / "copy"
    no_key = {**os.environ, "IMAGING_KEY_FILE": ""}
    sent = json.loads(imaging("sync", store, copy, "--json", env=no_key).stdout)
    assert len(sent["copied"]) == 2
    assert json.loads((copy / "datastore.json").read_text())["key"] == \
        keys.fingerprint_of(key_file)
    imaging("prune", "--store", copy, "--disk", "d", "--keep-last", "1", env=no_key)
    collected = imaging("gc", "--store", copy, "--safety-margin", "0", env=no_key).stdout
    assert "freed 0 B" not in collected  # the older image's own chunk: not its bases
    (newer,) = images_of(copy)
    assert "intact" in imaging("verify", newer, "--key", key_file).stdout
    imaging("restore", newer, tmp_path / "out.img", "--key", key_file)
    assert sha256_of(tmp_path / "out.img") == sha256_of(disk)
    imaging("backup", disk, "--store", tmp_path / "plain", "-q")
    line = one_error_line(imaging("sync", store, tmp_path / "plain", check=False, env=no_key))
    assert line.endswith(f"is not encrypted and {store} is encrypted with key "
                         f"{keys.fingerprint_of(key_file)}: a copy goes into a datastore "
                         "encrypted as its source is")


def test_recompress_keeps_an_encrypted_image_whole(encrypted, tmp_path):
    store, key_file, disk = encrypted
    image = images_of(store)[-1]
    imaging("recompress", image, "--level", "9", "--key", key_file)
    assert "intact" in imaging("verify", image, "--key", key_file).stdout
    imaging("restore", image, tmp_path / "out.img", "--key", key_file)
    assert sha256_of(tmp_path / "out.img") == sha256_of(disk)


def test_files_of_an_encrypted_image_list_and_extract_with_the_key(tmp_path):
    requires_root_loop_fuse()
    key_file = tmp_path / "k.key"
    keys.create(key_file)
    disk = build_disk(tmp_path / "disk.img", 24 * MiB, "dos", [PartSpec(20 * MiB, "ext4")],
                      seed=4)
    store = tmp_path / "store"
    imaging("backup", disk.path, "--store", store, "--disk", "d", "--key", key_file, "-q")
    image = images_of(store)[0]
    listed = json.loads(imaging("files", image, 1, "--json", "--key", key_file).stdout)
    names = [entry["name"] for entry in listed["entries"]]
    assert "lost+found" in names
    file = next(entry["name"] for entry in listed["entries"] if entry["type"] == "file")
    imaging("extract", image, 1, f"/{file}", "--to", tmp_path / "out", "--key", key_file)
    assert (tmp_path / "out" / file).stat().st_size == next(
        entry["size"] for entry in listed["entries"] if entry["name"] == file)
