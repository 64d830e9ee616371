"""sync: a second datastore receives the images it lacks and only the chunks it lacks; a
copy restores byte for byte; a killed sync leaves no half image and resends little."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from engine import REPO, MiB, imaging, one_error_line, sha256_of, text_like
from support.remotes import webdav_server
from test_delta_chunks import CHUNK, edited

from imaging.backup import backup
from imaging.base import rclone, tools
from imaging.base.errors import StoreError
from imaging.datastore.image import Image
from imaging.datastore.store import Datastore
from imaging.sync import LOCAL_BATCH_BYTES, sync


def published(store: Path) -> list[str]:
    """The images a datastore lists, as "<disk>/<stamp>"."""
    return sorted(f"{p.parent.name}/{p.name}" for p in Datastore.open(store).image_dirs())


@pytest.fixture
def source(tmp_path):
    """Two disks; disk d backed up twice (its second image holds delta chunks), e once."""
    disk, other = tmp_path / "d.img", tmp_path / "e.img"
    data = text_like(4 * CHUNK, seed=1)
    disk.write_bytes(data)
    other.write_bytes(text_like(2 * CHUNK, seed=5))
    store = tmp_path / "store"
    backup(str(disk), store, disk_id="d")
    backup(str(other), store, disk_id="e")
    disk.write_bytes(edited(data, seed=2))
    backup(str(disk), store, disk_id="d")
    return store, disk


def test_a_copy_holds_every_image_and_restores_byte_identical(source, tmp_path):
    store, disk = source
    copy = tmp_path / "copy"
    result = sync(store, copy)
    assert published(copy) == published(store) == result.held and len(result.copied) == 3
    assert result.image_bytes_sent == sum(p.stat().st_size for p in (store / "images").rglob("*")
                                          if p.is_file() and p.name != "verify.json")
    stored = {p.name for p in (store / "chunks").rglob("*.zst")}
    assert {p.name for p in (copy / "chunks").rglob("*.zst")} == stored
    assert result.chunks_sent == len(stored) and result.chunks_present == 0
    assert result.bytes_sent == sum(p.stat().st_size for p in (store / "chunks").rglob("*.zst"))
    newest = Datastore.open(copy).image_dirs("d")[-1]
    assert any(entry.base for entry in Image.open(newest).entries())  # deltas came along
    assert not (newest / "verify.json").exists()
    assert imaging("verify", newest).returncode == 0
    imaging("restore", newest, tmp_path / "restored.img")
    assert sha256_of(tmp_path / "restored.img") == sha256_of(disk)


def test_only_what_the_destination_lacks_travels(source, tmp_path):
    store, disk = source
    copy = tmp_path / "copy"
    sync(store, copy)
    again = sync(store, copy)
    assert (again.copied, again.chunks_sent, again.bytes_sent) == ([], 0, 0)
    assert len(again.present) == 3
    disk.write_bytes(edited(disk.read_bytes(), seed=3, places=(5 * MiB,)))
    third = backup(str(disk), store, disk_id="d")
    later = sync(store, copy)
    assert later.copied == [f"d/{third.image.name}"]
    assert later.chunks_sent == 1 and later.bytes_sent == third.new_bytes


def test_disks_and_last_choose_what_is_copied(source, tmp_path):
    store, _ = source
    chosen = imaging("sync", store, tmp_path / "copy", "--disk", "d", "--last", "1", "--json")
    result = json.loads(chosen.stdout)
    newest = Datastore.open(store).image_dirs("d")[-1]
    assert result["copied"] == [f"d/{newest.name}"]
    assert published(tmp_path / "copy") == [f"d/{newest.name}"]
    # The newest image's deltas need their bases, which only the older image names.
    imaging("restore", tmp_path / "copy" / "images" / "d" / newest.name,
            tmp_path / "restored.img")
    missing = imaging("sync", store, tmp_path / "copy", "--disk", "nope", check=False)
    assert one_error_line(missing) == f"imaging: error: {store.resolve()} holds no image of disk nope"


def test_a_corrupt_source_chunk_is_not_copied_and_no_image_appears(source, tmp_path):
    store, _ = source
    image = Datastore.open(store).image_dirs("e")[0]
    digest = Image.open(image).index()[1]
    chunk = Datastore.open(store).chunk_path(digest)
    frame = bytearray(chunk.read_bytes())
    frame[len(frame) // 2] ^= 0xFF
    chunk.write_bytes(frame)
    result = imaging("sync", store, tmp_path / "copy", "--disk", "e", check=False)
    error = one_error_line(result)
    assert error.startswith(f"imaging: error: chunk {digest}")
    assert published(tmp_path / "copy") == []
    assert not Datastore.open(tmp_path / "copy").chunk_path(digest).exists()


def test_a_destination_of_another_chunk_size_is_refused(source, tmp_path):
    store, _ = source
    Datastore.open_or_create(tmp_path / "copy", chunk_size=1 * MiB)
    result = imaging("sync", store, tmp_path / "copy", check=False)
    assert one_error_line(result) == (
        f"imaging: error: {(tmp_path / 'copy').resolve()} stores chunks of {MiB} bytes, "
        f"{store.resolve()} of {CHUNK}: a copy needs the same chunk size")


KILLED_SYNC_CHUNKS = 128
LOCAL_BATCH_CHUNKS = LOCAL_BATCH_BYTES // CHUNK  # what a copy makes durable at once


def test_a_sync_killed_midway_lists_no_half_image_and_its_rerun_resends_little(tmp_path):
    disk = tmp_path / "big.img"
    # Incompressible, and many chunks: progress events come a few times a second, and a
    # sync checks several chunks a second per core, so the kill must land well before the end.
    with open(disk, "wb") as handle:
        for seed in range(KILLED_SYNC_CHUNKS):
            handle.write(os.urandom(CHUNK))
    store = tmp_path / "store"
    backup(str(disk), store, disk_id="big")
    copy = tmp_path / "copy"
    run = subprocess.Popen([sys.executable, "-m", "imaging", "sync", str(store), str(copy),
                            "--json-progress"], cwd=REPO, stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, text=True)
    try:
        for line in run.stderr:  # JSON progress lines: kill past the first durable batch
            event = json.loads(line)
            if event.get("phase") == "sync" and event["done"] > LOCAL_BATCH_CHUNKS:
                os.kill(run.pid, signal.SIGKILL)
                break
    finally:
        run.kill()
        run.wait()
    sent_before = {p.name for p in (copy / "chunks").rglob("*.zst")}
    # Chunks become durable in batches: what was in flight is sent again.
    assert LOCAL_BATCH_CHUNKS <= len(sent_before) < KILLED_SYNC_CHUNKS
    assert published(copy) == []
    rerun = sync(store, copy)
    assert rerun.chunks_present == len(sent_before)
    assert rerun.chunks_sent + rerun.chunks_present == KILLED_SYNC_CHUNKS
    assert published(copy) == published(store)
    image = Datastore.open(copy).image_dirs("big")[0]
    imaging("restore", image, tmp_path / "restored.img")
    assert sha256_of(tmp_path / "restored.img") == sha256_of(disk)


@pytest.fixture
def webdav(tmp_path):
    with webdav_server(tmp_path) as served:
        yield served


def test_a_copy_to_a_webdav_remote_restores_byte_identical_and_resends_only_damage(
        source, webdav, tmp_path):
    store, disk = source
    served, remote = webdav
    first = imaging("sync", store, remote, "--bwlimit", "100M", "--json")
    result = json.loads(first.stdout)
    assert len(result["copied"]) == 3 and result["destination"] == remote
    assert published(served / "store") == published(store)
    stored = sorted(p.relative_to(store / "chunks") for p in (store / "chunks").rglob("*.zst"))
    assert sorted(p.relative_to(served / "store" / "chunks")
                  for p in (served / "store" / "chunks").rglob("*.zst")) == stored
    newest = Datastore.open(served / "store").image_dirs("d")[-1]
    imaging("restore", newest, tmp_path / "restored.img")
    assert sha256_of(tmp_path / "restored.img") == sha256_of(disk)

    again = json.loads(imaging("sync", store, remote, "--json").stdout)
    assert (again["copied"], again["chunks_sent"]) == ([], 0)
    # A chunk cut short at the remote (an upload killed midway) is sent again, whole.
    damaged = Datastore.open(served / "store").chunk_path(Image.open(newest).index()[0])
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:100])
    manifest = newest / "manifest.json"
    manifest.unlink()  # an image whose manifest never arrived is not there yet
    repaired = json.loads(imaging("sync", store, remote, "--json").stdout)
    assert repaired["chunks_sent"] == 1 and repaired["copied"] == [f"d/{newest.name}"]
    assert damaged.read_bytes() == whole and manifest.exists()


def test_a_remote_no_server_answers_is_one_line(source, tmp_path):
    store, _ = source
    result = imaging("sync", store, "rclone::webdav,url='http://127.0.0.1:9':store",
                     "--disk", "e", check=False)
    error = one_error_line(result)
    assert error.startswith("imaging: error: cannot reach "
                            "rclone::webdav,url='http://127.0.0.1:9':store: ")
    assert error.endswith("connection refused")


@pytest.mark.parametrize("where", [".", "images/copy", ".."])
def test_a_destination_that_is_or_holds_or_lies_in_the_source_is_refused(source, where):
    store, _ = source
    destination = store / where
    before = sorted(p.relative_to(store.parent) for p in store.parent.rglob("*"))
    result = imaging("sync", store, destination, check=False)
    assert one_error_line(result) == (f"imaging: error: {destination} is the source datastore, "
                                      "or lies inside it or around it")
    assert sorted(p.relative_to(store.parent) for p in store.parent.rglob("*")) == before


def test_a_password_in_the_remote_never_shows(source, webdav, tmp_path):
    store, _ = source
    _, remote = webdav
    secret = remote.replace("url='http://", "url='http://ann:s3cret@").replace(
        "':store", "',pass=hunter2:store")
    result = imaging("sync", store, secret, "--disk", "e", "--json", check=False)
    shown = result.stdout + result.stderr
    assert "s3cret" not in shown and "hunter2" not in shown and "***" in shown


def test_a_pull_from_a_remote_copies_into_a_folder_byte_identical(source, webdav, tmp_path):
    store, disk = source
    served, remote = webdav
    imaging("sync", store, remote)
    pulled = json.loads(imaging("sync", remote, tmp_path / "pulled", "--json").stdout)
    assert pulled["source"] == remote and len(pulled["copied"]) == 3
    assert published(tmp_path / "pulled") == published(store)
    assert {p.name for p in (tmp_path / "pulled" / "chunks").rglob("*.zst")} == \
        {p.name for p in (store / "chunks").rglob("*.zst")}
    newest = Datastore.open(tmp_path / "pulled").image_dirs("d")[-1]
    imaging("restore", newest, tmp_path / "restored.img")
    assert sha256_of(tmp_path / "restored.img") == sha256_of(disk)
    again = json.loads(imaging("sync", remote, tmp_path / "pulled", "--json").stdout)
    assert (again["copied"], again["chunks_sent"]) == ([], 0)
    assert not list((served / "store" / "jobs").iterdir())  # its reader's token went
    unknown = imaging("sync", remote, tmp_path / "pulled", "--disk", "nosuch", check=False)
    assert one_error_line(unknown) == f"imaging: error: {remote} holds no image of disk nosuch"


def test_a_remote_s_password_reaches_rclone_by_its_environment_never_its_arguments(
        source, tmp_path, monkeypatch):
    store, disk = source
    seen = []
    started, ran = tools.started, tools.run

    def watched(function):
        def call(tool, package, arguments, **options):
            if tool == "rclone":
                seen.append((list(arguments), options.get("env") or {}))
            return function(tool, package, arguments, **options)
        return call

    monkeypatch.setattr(tools, "started", watched(started))
    monkeypatch.setattr(tools, "run", watched(ran))
    with webdav_server(tmp_path, login=("ann", "s3cret")) as (served, remote):
        obscured = remote.split("pass=", 1)[1].split(":", 1)[0]
        result = sync(store, remote, disks=["d"])
        assert published(served / "store") == \
            sorted(f"d/{path.name}" for path in Datastore.open(store).image_dirs("d"))
        assert len(result.copied) == 2
        with rclone.mounted(rclone.remote_of(remote)) as point:  # a long-lived rclone too
            assert sorted(os.listdir(point / "images" / "d")) == \
                sorted(p.name for p in Datastore.open(store).image_dirs("d"))
        wrong = remote.replace(obscured, obscured[:-4] + "AAAA")
        with pytest.raises(StoreError) as refused:
            sync(store, wrong, disks=["d"])
    assert seen and all(obscured[:-4] not in " ".join(arguments) for arguments, _ in seen)
    passwords = [env["RCLONE_CONFIG_IMAGING0_PASS"] for arguments, env in seen
                 if "imaging0:" in " ".join(arguments)]
    assert obscured in passwords and set(passwords) == {obscured, obscured[:-4] + "AAAA"}
    assert obscured[:-4] not in str(refused.value) and "pass=***" in str(refused.value)
    assert disk.exists()


@pytest.mark.parametrize("written, hidden", [
    (":s3,env_auth,secret_access_key=S3CR3T:bucket/store", {"ENV_AUTH": "true"}),
    (":webdav,url='http://h:8080/a,b',pass='it''s':store", {"URL": "http://h:8080/a,b",
                                                            "PASS": "it's"}),
])
def test_a_connection_string_is_parsed_as_rclone_writes_it(written, hidden):
    passed = rclone._hidden(["lsf", written])
    assert passed.arguments[1].startswith("imaging0:") and "," not in passed.arguments[1]
    for option, value in hidden.items():
        assert passed.env[f"RCLONE_CONFIG_IMAGING0_{option}"] == value


def test_a_connection_string_rclone_would_not_take_is_refused_not_passed_on():
    with pytest.raises(StoreError, match="not written as rclone takes them") as refused:
        rclone.run("lsf", "nas,=S3CR3T:store")
    assert "S3CR3T" not in str(refused.value)
