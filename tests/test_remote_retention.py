"""A remote copy keeps its own retention: prune, gc, protect and unprotect run there through
rclone, the source untouched; they take turns with syncs and readers through tokens at the
remote."""
from __future__ import annotations

import json
import os
import time

import pytest
from engine import imaging, one_error_line, sha256_of, text_like
from support.remotes import sftp_server, webdav_server
from test_delta_chunks import CHUNK
from test_sync import published

from imaging.backup import backup
from imaging.datastore.remote import REMOTE_STALE, RemoteStore
from imaging.datastore.store import Datastore
from imaging.gc import referenced_chunks


@pytest.fixture
def copied(request, tmp_path):
    """Disk d backed up twice with nothing in common, e once, and the store synced to a
    remote (WebDAV unless the test says sftp): (source store, d, served folder, remote)."""
    disk, other, store = tmp_path / "d.img", tmp_path / "e.img", tmp_path / "store"
    other.write_bytes(text_like(2 * CHUNK, seed=5))
    backup(str(other), store, disk_id="e")
    for seed in (1, 2):
        disk.write_bytes(text_like(3 * CHUNK, seed=seed))
        backup(str(disk), store, disk_id="d")
    server = sftp_server if getattr(request, "param", "webdav") == "sftp" else webdav_server
    with server(tmp_path) as (served, remote):
        imaging("sync", store, remote)
        yield store, disk, served / "store", remote


def chunk_names(store) -> set[str]:
    return {path.name[:-len(".zst")] for path in (store / "chunks").rglob("*.zst")}


def referenced(store) -> set[str]:
    return referenced_chunks(Datastore.open(store))[1]


@pytest.mark.parametrize("copied", ["webdav", "sftp"], indirect=True)
def test_prune_and_gc_at_a_remote_keep_what_they_should_and_the_copy_restores(copied, tmp_path):
    store, disk, served, remote = copied
    images = published(served)
    before = published(store), chunk_names(store)
    pruned = imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1")
    assert pruned.stdout.splitlines()[-1] == "removed 1 of 2 images of d; `gc` frees their chunks"
    assert published(served) == [images[1], images[2]]  # the newest of d, and e's
    assert chunk_names(served) > referenced(served)  # the old image's own chunks still there
    collected = imaging("gc", "--store", remote)
    assert "kept" in collected.stdout
    assert chunk_names(served) == referenced(served)
    assert (published(store), chunk_names(store)) == before  # the source is not touched
    assert not list((served / "jobs").iterdir())
    restored = tmp_path / "restored.img"
    imaging("restore", f"{remote}/images/{images[1]}", restored)
    assert sha256_of(restored) == sha256_of(disk)
    assert imaging("verify", f"{remote}/images/{images[1]}", "--read-data").returncode == 0


def test_a_protected_image_at_a_remote_is_kept_until_unprotected(copied):
    store, _, served, remote = copied
    oldest = published(served)[0]
    imaging("protect", f"{remote}/images/{oldest}", "--note", "before the upgrade")
    mark = json.loads((served / "images" / oldest / "protected").read_text())
    assert mark["note"] == "before the upgrade"
    kept = imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1").stdout
    assert f"keep          {oldest.split('/')[1]}  protected" in kept
    assert oldest in published(served)
    assert "no longer protected" in imaging("unprotect", f"{remote}/images/{oldest}").stdout
    imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1")
    assert oldest not in published(served) and oldest in published(store)


def test_gc_and_a_sync_at_one_remote_take_turns(copied):
    store, _, served, remote = copied
    chunks = chunk_names(served)
    syncing = RemoteStore(remote[len("rclone:"):]).register("sync-in", "sync from elsewhere")
    with syncing:
        refused = imaging("gc", "--store", remote, check=False)
    assert one_error_line(refused).startswith(
        "imaging: error: garbage collection did not start: sync from elsewhere runs at ")
    assert chunk_names(served) == chunks
    with RemoteStore(remote[len("rclone:"):]).register("gc", "garbage collection"):
        refused = imaging("sync", store, remote, check=False)
    assert one_error_line(refused).startswith(f"imaging: error: sync from {store} did not "
                                              "start: garbage collection runs at ")
    assert not list((served / "jobs").iterdir())


def test_a_prune_and_a_sync_at_one_remote_take_turns_and_an_unreadable_token_stops_both(
        copied):
    store, _, served, remote = copied
    images = published(served)
    with RemoteStore(remote[len("rclone:"):]).register("sync-in", "sync from elsewhere"):
        refused = imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1",
                          check=False)
    assert one_error_line(refused).startswith(
        "imaging: error: prune of d did not start: sync from elsewhere runs at ")
    (served / "jobs" / "half-written").write_text('{"kind": "sync-')
    for command in (["prune", "--store", remote, "--disk", "d", "--keep-last", "1"],
                    ["sync", store, remote]):
        line = one_error_line(imaging(*command, check=False))
        assert "did not start: an unreadable registration (half-written) runs at " in line
    assert published(served) == images


def test_a_restore_from_a_remote_reached_read_only_works_unregistered(tmp_path):
    disk, store = tmp_path / "d.img", tmp_path / "store"
    disk.write_bytes(text_like(2 * CHUNK, seed=7))
    image = backup(str(disk), store, disk_id="d").image
    with webdav_server(tmp_path) as (served, remote):
        imaging("sync", store, remote)
    with webdav_server(tmp_path, read_only=True) as (served, remote):
        imaging("restore", f"{remote}/images/d/{image.name}", tmp_path / "restored.img")
        assert sha256_of(tmp_path / "restored.img") == sha256_of(disk)
        assert not list((served / "store" / "jobs").iterdir())


def test_prune_at_a_remote_defers_an_image_being_read(copied):
    _, _, served, remote = copied
    oldest = published(served)[0]
    reader = RemoteStore(remote[len("rclone:"):]).register("restore", f"restore {oldest}",
                                                          images=[oldest])
    with reader:
        result = imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1")
    assert "deferred 1 being read" in result.stdout.splitlines()[-1]
    assert oldest in published(served)


def test_gc_at_a_remote_removes_half_images_and_dead_tokens(copied):
    _, _, served, remote = copied
    newest = published(served)[1]
    (served / "images" / newest / "manifest.json").unlink()  # a sync that died before the manifest
    dead = served / "jobs" / "gone-1-cafe"
    dead.parent.mkdir(exist_ok=True)
    dead.write_text(json.dumps({"kind": "sync-in", "what": "a dead sync", "host": "gone",
                                "pid": 1, "started": 0}))
    long_ago = time.time() - REMOTE_STALE - 60
    os.utime(dead, (long_ago, long_ago))
    imaging("gc", "--store", remote)
    assert not (served / "images" / newest).exists() and not dead.exists()
    assert chunk_names(served) == referenced(served)


def test_gc_on_the_remote_s_own_folder_keeps_every_chunk_while_a_sync_runs_into_it(copied):
    _, _, served, remote = copied
    imaging("prune", "--store", remote, "--disk", "d", "--keep-last", "1")
    chunks = chunk_names(served)
    assert chunks > referenced(served)
    # rclone gives an uploaded chunk its source's mtime: no age tells it from garbage
    with RemoteStore(remote[len("rclone:"):]).register("sync-in", "sync from elsewhere"):
        imaging("gc", "--store", served, "--safety-margin", "0")
    assert chunk_names(served) == chunks
    imaging("gc", "--store", served, "--safety-margin", "0")
    assert chunk_names(served) == referenced(served)
