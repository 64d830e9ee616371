"""A datastore on a remote (OpenSSH's SFTP and rclone's WebDAV on loopback): list, verify
(quick, and --read-data) and restore read it through a read-only rclone mount; the disaster
drill restores byte for byte, an encrypted copy with the key only; a damaged chunk at the
remote is found; nothing is left mounted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from engine import imaging, one_error_line, sha256_of, text_like
from support.remotes import sftp_server, webdav_server
from test_delta_chunks import CHUNK, edited

from imaging.datastore import keys
from imaging.datastore.store import Datastore

SERVERS = {"sftp": sftp_server, "webdav": webdav_server}


@pytest.fixture(params=sorted(SERVERS))
def remote(request, tmp_path):
    """(the folder served, the rclone: remote of the datastore `store` in it)."""
    folder = tmp_path / request.param
    folder.mkdir()
    with SERVERS[request.param](folder) as served:
        yield served


def no_remote_mounted() -> bool:
    with open("/proc/self/mounts") as mounts:
        return "imaging-remote-" not in mounts.read()


@pytest.fixture
def history(tmp_path):
    """(store, disk): disk d backed up twice, the second image with delta chunks."""
    disk = tmp_path / "d.img"
    data = text_like(3 * CHUNK + 12345, seed=7)
    disk.write_bytes(data)
    store = tmp_path / "store"
    imaging("backup", disk, "--store", store, "--disk", "d", "-q")
    disk.write_bytes(edited(data, seed=8, places=(100, CHUNK + 9)))
    imaging("backup", disk, "--store", store, "--disk", "d", "-q")
    return store, disk


def test_the_disaster_drill_restores_from_the_remote_byte_for_byte(remote, history, tmp_path):
    served, remote_store = remote
    store, disk = history
    imaging("sync", store, remote_store)
    listed = json.loads(imaging("list", "--store", remote_store, "--json").stdout)
    stamps = [record["stamp"] for record in listed]
    assert stamps == [path.name for path in Datastore.open(store).image_dirs("d")]
    assert all(record["error"] is None and record["disk_id"] == "d" for record in listed)
    newest = f"{remote_store}/images/d/{stamps[-1]}"
    quick = imaging("verify", newest).stdout
    assert quick.strip().endswith("distinct chunks there (not read: --read-data downloads and "
                                  "checks them)")
    assert "intact" in imaging("verify", newest, "--read-data").stdout
    restored = imaging("restore", newest, tmp_path / "out.img").stdout
    assert "verified: every chunk matches" in restored
    assert sha256_of(tmp_path / "out.img") == sha256_of(disk)
    assert not (served / "store" / "jobs").exists() or \
        not [name for name in os.listdir(served / "store" / "jobs") if not name.startswith(".")]
    assert not (served / "store" / "images" / "d" / stamps[-1] / "verify.json").exists()
    assert no_remote_mounted()


def test_a_damaged_chunk_at_the_remote_is_found_by_read_data_and_a_missing_one_by_either(
        remote, history, tmp_path):
    served, remote_store = remote
    store, _ = history
    imaging("sync", store, remote_store)
    stamp = Datastore.open(store).image_dirs("d")[-1].name
    newest = f"{remote_store}/images/d/{stamp}"
    chunks = sorted((served / "store" / "chunks").rglob("*.zst"))
    damaged, gone = chunks[0], chunks[-1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = imaging("verify", newest, "--read-data", check=False)
    assert result.returncode == 1
    name = damaged.name.removesuffix(".zst")
    assert f"chunk {name}: corrupt" in result.stdout
    assert (served / "store" / "chunks" / name[:2] / damaged.name).exists()  # not set aside there
    gone.unlink()
    for quick in ([], ["--read-data"]):
        result = imaging("verify", newest, *quick, check=False)
        assert f"chunk {gone.name.removesuffix('.zst')}: missing" in result.stdout
    line = one_error_line(imaging("restore", newest, tmp_path / "out.img", check=False))
    assert gone.name.removesuffix(".zst") in line or name in line
    assert no_remote_mounted()


def test_an_encrypted_copy_off_site_restores_with_the_key_alone(history, tmp_path):
    folder = tmp_path / "sftp"
    folder.mkdir()
    key_file = tmp_path / "k.key"
    keys.create(key_file)
    disk = tmp_path / "e.img"
    disk.write_bytes(text_like(2 * CHUNK, seed=9))
    store = tmp_path / "encrypted"
    imaging("backup", disk, "--store", store, "--disk", "e", "--key", key_file, "-q")
    no_key = {**os.environ, "IMAGING_KEY_FILE": ""}
    with sftp_server(folder) as (served, remote_store):
        imaging("sync", store, remote_store, env=no_key)
        for path in (served / "store").rglob("*"):
            if path.is_file() and path.name not in ("RESTORE.txt",):
                assert disk.read_bytes()[:4096] not in path.read_bytes()
        stamp = Datastore.open(store).image_dirs("e")[0].name
        image = f"{remote_store}/images/e/{stamp}"
        listed = json.loads(imaging("list", "--store", remote_store, "--json", env=no_key).stdout)
        assert [(record["encrypted"], record["size"]) for record in listed] == \
            [(True, 2 * CHUNK)]
        line = one_error_line(imaging("restore", image, tmp_path / "out.img", check=False,
                                      env=no_key))
        assert f"is encrypted with key {keys.fingerprint_of(key_file)}" in line
        imaging("restore", image, tmp_path / "out.img", "--key", key_file)
        assert sha256_of(tmp_path / "out.img") == sha256_of(disk)
    assert no_remote_mounted()


def test_what_only_a_folder_takes_is_refused_on_a_remote_in_one_line(tmp_path):
    with webdav_server(tmp_path) as (_, remote_store):
        for command in (["rehome", "--store", remote_store],
                        ["backup", tmp_path / "x.img", "--store", remote_store]):
            line = one_error_line(imaging(*command, check=False))
            assert line == (f"imaging: error: {command[0]} takes a datastore folder, not an "
                            "rclone: remote (on a remote: list, verify, restore, export, files, "
                            "extract, prune, gc, protect, unprotect, and sync to and from it)")
        line = one_error_line(imaging("restore", f"{remote_store}/d/stamp", tmp_path / "o.img",
                                      check=False))
        assert line.endswith("an image on a remote is rclone:REMOTE/images/DISK/STAMP")
        for command in (["gc", "--store", remote_store],
                        ["prune", "--store", remote_store, "--disk", "d", "--keep-last", "1"]):
            line = one_error_line(imaging(*command, check=False))
            assert line == f"imaging: error: {remote_store}: not a datastore (no datastore.json)"
        assert not Path(tmp_path / "o.img").exists()
