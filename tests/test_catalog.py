"""The catalog and the records the web layer keeps: image listings, datastore
usage, the manifest's validation, the verification record, and every
operation's result as JSON."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from engine import MiB, imaging, one_error_line, write_random

from imaging.backup import backup
from imaging.base.errors import ImageError, StoreError
from imaging.datastore.catalog import datastore_usage, list_images
from imaging.datastore.image import Image, stamp_of
from imaging.datastore.manifest import Manifest
from imaging.export import export
from imaging.gc import collect
from imaging.importer import import_archive
from imaging.recompress import recompress
from imaging.restore import restore
from imaging.verify import verify

COPIES = 2_000
DISKS = 20
IDENTITY = ("id", "model", "serial", "wwn", "size", "path", "host")


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A real, verified image of a 12 MiB disk file."""
    folder = tmp_path_factory.mktemp("original")
    write_random(folder / "disk.img", 12 * MiB)
    image = backup(str(folder / "disk.img"), folder / "store", disk_id="original").image
    verify(image)
    return image


def _copy_images(original: Path, store: Path, count: int) -> list[Path]:
    """`count` image directories over DISKS disks holding the original's manifest;
    every other one also holds its verification record."""
    shutil.copytree(original.parent.parent.parent, store, ignore=shutil.ignore_patterns("images"))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    made = []
    for number in range(count):
        image = (store / "images" / f"disk-{number % DISKS:02d}"
                 / stamp_of(start + dt.timedelta(hours=number // DISKS)))
        image.mkdir(parents=True)
        shutil.copyfile(original / "manifest.json", image / "manifest.json")
        if number % 2:
            shutil.copyfile(original / "verify.json", image / "verify.json")
        made.append(image)
    return made


@pytest.fixture
def copied(original, tmp_path) -> tuple[Path, list[Path]]:
    store = tmp_path / "store"
    return store, _copy_images(original, store, COPIES)


def test_every_copied_image_is_listed_as_its_manifest_and_record_say(original, copied):
    store, images = copied
    manifest = json.loads((original / "manifest.json").read_text())
    verification = json.loads((original / "verify.json").read_text())
    assert verification["ok"] is True and verification["chunks"] == 3
    records = list_images(store)
    # By disk, then oldest first.
    assert [Path(record.path) for record in records] == \
        sorted(images, key=lambda path: (path.parent.name, path.name))
    for record in records:
        path = Path(record.path)
        assert (record.disk_id, record.stamp) == (path.parent.name, path.name)
        assert record.error is None
        assert record.disk == {key: manifest["disk"][key] for key in IDENTITY}
        for key in ("size", "mode", "status", "level", "sha256", "created", "seconds",
                    "stored_bytes", "new_bytes", "bad_bytes", "mounted_rw"):
            assert getattr(record, key) == manifest[key], key
        was_verified = (path / "verify.json").exists()
        assert record.verified is was_verified
        assert record.verified_at == (verification["at"] if was_verified else None)
        assert record.verify_ok is (True if was_verified else None)
    assert sum(record.verified for record in records) == COPIES // 2
    one_disk = list_images(store, "disk-07")
    assert len(one_disk) == COPIES // DISKS
    assert {record.disk_id for record in one_disk} == {"disk-07"}
    with pytest.raises(StoreError, match="invalid disk id"):
        list_images(store, "../images")


def test_list_prints_the_records_as_a_table_and_as_json(copied):
    store, images = copied
    listed = json.loads(imaging("list", "--store", store, "--json").stdout)
    assert listed == [record.as_dict() for record in list_images(store)]
    table = _columns(imaging("list", "--store", store, "--disk", "disk-01").stdout)
    assert table[0] == ["DISK", "IMAGE", "SIZE", "STORED", "NEW", "MODE", "MOUNTED RW",
                        "VERIFIED", "STATUS"]
    assert len(table) == 1 + COPIES // DISKS
    at = json.loads((images[1] / "verify.json").read_text())["at"]
    # disk-01 holds the odd-numbered copies: every one of them verified.
    assert {tuple(row[2:]) for row in table[1:]} == {
        ("12.0 MiB", "12.0 MiB", "12.0 MiB", "raw", "no", f"ok {at}", "complete")}


def _columns(table: str) -> list[list[str]]:
    """The cells of each line of a table whose columns are two or more spaces apart."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]


def test_a_damaged_image_is_listed_with_its_reason_and_the_others_still_are(copied):
    store, images = copied
    wrong_type, no_manifest, bad_record = images[4], images[5], images[7]
    manifest = json.loads((wrong_type / "manifest.json").read_text())
    (wrong_type / "manifest.json").write_text(json.dumps(dict(manifest, level="3")))
    (no_manifest / "manifest.json").unlink()
    (bad_record / "verify.json").write_text('{"at": "yesterday"}')
    records = {Path(record.path): record for record in list_images(store)}
    assert len(records) == COPIES
    damaged = {path: record for path, record in records.items() if record.error}
    assert set(damaged) == {wrong_type, no_manifest, bad_record}
    assert damaged[wrong_type].error == \
        f"{wrong_type / 'manifest.json'}: invalid manifest: 'level' is a string, not an integer"
    assert damaged[wrong_type].size is None and damaged[wrong_type].verified is False
    assert damaged[no_manifest].error == f"{no_manifest}: not an image (no manifest.json)"
    # The image itself reads fine; only its verification is unknown.
    assert damaged[bad_record].size == manifest["size"] and not damaged[bad_record].verified
    assert damaged[bad_record].error == f"{bad_record / 'verify.json'}: invalid verification record"

    result = imaging("list", "--store", store, check=False)
    line = one_error_line(result)
    assert "'level' is a string" in line and "(and 2 more damaged images)" in line
    rows = {tuple(row.split()[:2]): row for row in result.stdout.splitlines()[1:]}
    assert len(rows) == COPIES
    assert "unreadable: " in rows[(wrong_type.parent.name, wrong_type.name)]
    assert "unreadable record" in rows[(bad_record.parent.name, bad_record.name)]


def test_datastore_usage_counts_chunks_images_and_space(tmp_path):
    store = tmp_path / "store"
    for name, size in (("a.img", 8 * MiB), ("b.img", 12 * MiB)):
        write_random(tmp_path / name, size, seed=size)
        backup(str(tmp_path / name), store, disk_id=name.removesuffix(".img"))
    chunks = sorted((store / "chunks").glob("*/*.zst"))
    # Neither a chunk set aside as corrupt nor a writer's temporary file is a chunk.
    folder = chunks[0].parent
    (folder / f"{'0' * 64}.zst.bad").write_bytes(b"x" * 100)
    (folder / f".{'1' * 64}.zst.1234abcd.tmp").write_bytes(b"y" * 100)
    usage = datastore_usage(store)
    space = os.statvfs(store)
    assert usage.path == str(store)
    assert usage.total_bytes == space.f_blocks * space.f_frsize
    assert 0 < usage.free_bytes <= usage.total_bytes
    assert (usage.chunk_count, usage.chunk_bytes) == (5, sum(p.stat().st_size for p in chunks))
    assert (usage.image_count, usage.logical_bytes) == (2, 20 * MiB)
    assert json.loads(json.dumps(usage.as_dict())) == usage.as_dict()


@pytest.mark.parametrize("change, says", [
    (lambda m: m.update(size="12582912"), "'size' is a string, not an integer"),
    (lambda m: m.update(size=True), "'size' is a boolean, not an integer"),
    (lambda m: m.update(format=2), "unsupported manifest format 2"),
    (lambda m: m.pop("sha256"), "it lacks 'sha256'"),
    (lambda m: m.update(sha256="F" * 64), "'sha256' is \"FFFF"),
    (lambda m: m.update(index_sha256="abc"), "'index_sha256' is \"abc\", not a lowercase hex"),
    (lambda m: m.update(mode="sparse"), "'mode' is \"sparse\", not one of raw, used"),
    (lambda m: m.update(status="done"), "'status' is \"done\", not one of complete, "),
    (lambda m: m.update(bad_bytes=-1), "'bad_bytes' is -1, less than 0"),
    (lambda m: m.update(level=30), "'level' is 30, not a zstd level (1 to 22)"),
    (lambda m: m.update(created="yesterday"), "'created' is \"yesterday\", not a UTC time"),
    (lambda m: m.update(chunks=4), "'chunks' is 4, but its 'size' and 'chunk_size' make 3"),
    (lambda m: m.update(mounted_rw="yes"), "'mounted_rw' is a string, not true or false"),
    (lambda m: m["disk"].pop("id"), "'disk' lacks 'id'"),
    (lambda m: m["disk"].update(serial=7), "'disk' field 'serial' is an integer, not a string"),
    (lambda m: m.update(partitions=[{"number": 1}]), "'partitions' item 0 lacks 'start'"),
    (lambda m: m.update(read_map=[[0, 512, 3]]), "'read_map' item 0 is [0, 512, 3], not an"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_bad_manifest_field_is_named_with_the_file_in_one_line(original, change, says):
    manifest = json.loads((original / "manifest.json").read_text())
    change(manifest)
    with pytest.raises(ImageError) as failure:
        Manifest.from_dict(manifest, original / "manifest.json")
    message = str(failure.value)
    assert message.startswith(f"{original / 'manifest.json'}: ") and says in message
    assert "\n" not in message


def test_manifest_round_trips_and_keeps_what_a_newer_engine_wrote(original):
    written = json.loads((original / "manifest.json").read_text())
    newer = dict(written, snapshot={"kind": "lvm", "name": "root-snap"})
    manifest = Manifest.from_dict(newer, "manifest.json")
    assert manifest.as_dict() == newer
    assert Manifest.from_dict(written, "manifest.json").as_json() == \
        (original / "manifest.json").read_text()
    # An older engine recorded only the mount a forced used-mode backup went past.
    older = {key: value for key, value in written.items() if key != "mounted_rw"}
    assert Manifest.from_dict(older, "m").mounted_rw is False
    older["forced_past_mount"] = "/dev/loop3 at /mnt"
    assert Manifest.from_dict(older, "m").mounted_rw is True


def test_verify_records_its_outcome_for_the_catalog(tmp_path):
    write_random(tmp_path / "disk.img", 12 * MiB)
    store = tmp_path / "store"
    image = backup(str(tmp_path / "disk.img"), store, disk_id="d").image
    assert not list_images(store)[0].verified

    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    intact = verify(image)
    record = json.loads((image / "verify.json").read_text())
    assert record == {"at": intact.at, "ok": True, "chunks": 3, "problems": []}
    at = dt.datetime.strptime(record["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert before <= at <= dt.datetime.now(dt.timezone.utc)
    listed = list_images(store)[0]
    assert (listed.verified, listed.verified_at, listed.verify_ok) == (True, intact.at, True)

    victim = Image.open(image).index()[1]
    chunk = store / "chunks" / victim[:2] / f"{victim}.zst"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    damaged = verify(image)
    record = json.loads((image / "verify.json").read_text())
    assert record["ok"] is False and record["chunks"] == 3
    assert [problem["digest"] for problem in record["problems"]] == [victim]
    assert record["problems"][0]["reason"].startswith("corrupt")
    listed = list_images(store)[0]
    assert (listed.verified, listed.verified_at, listed.verify_ok) == (True, damaged.at, False)
    assert _columns(imaging("list", "--store", store).stdout)[1][7] == f"FAILED {damaged.at}"


def _json_safe(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_safe(item) for key, item in value.items())
    if isinstance(value, list):
        return all(map(_json_safe, value))
    return value is None or isinstance(value, (str, int, float, bool))


def _round_trip(result) -> dict:
    """The result as a Celery JSON result backend hands it back, checked to be unchanged."""
    as_dict = result.as_dict()
    assert _json_safe(as_dict), as_dict
    returned = json.loads(json.dumps(as_dict))
    assert returned == as_dict
    return returned


def test_every_operations_result_survives_a_json_round_trip(tmp_path):
    write_random(tmp_path / "disk.img", 12 * MiB)
    store = tmp_path / "store"
    backed_up = backup(str(tmp_path / "disk.img"), store, disk_id="d")
    assert _round_trip(backed_up) == {
        "image": str(backed_up.image), "size": 12 * MiB, "seconds": backed_up.seconds,
        "stored_bytes": backed_up.stored_bytes, "new_bytes": backed_up.new_bytes,
        "bad_bytes": 0, "sha256": backed_up.sha256, "status": "complete", "mounted_rw": False}

    checked = verify(backed_up.image)
    assert _round_trip(checked) == {"image": str(backed_up.image), "chunks": 3, "problems": [],
                                    "at": checked.at, "ok": True}

    restored = restore(str(backed_up.image), str(tmp_path / "restored.img"))
    assert _round_trip(restored) == {"target": str(tmp_path / "restored.img"), "size": 12 * MiB,
                                     "seconds": restored.seconds, "verified": True}

    recompressed = recompress(backed_up.image, 5)
    assert _round_trip(recompressed) == {
        "image": str(backed_up.image), "level": 5, "chunks": 3, "before": recompressed.before,
        "after": recompressed.after, "seconds": recompressed.seconds}

    exported = export(backed_up.image, tmp_path / "disk.zst", split_size=5 * MiB)
    returned = _round_trip(exported)
    assert returned["files"] == [str(path) for path in exported.files]
    assert [Path(name).name for name in returned["files"]] == \
        ["disk.zst.aa", "disk.zst.ab", "disk.zst.ac", "disk.zst-parts.sha256"]
    assert (returned["size"], returned["compressed_bytes"]) == (12 * MiB, exported.compressed_bytes)

    with open(tmp_path / "disk.img", "rb") as raw, gzip.open(tmp_path / "sda.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    imported = import_archive([tmp_path / "sda.gz"], store, disk_id="sda")
    returned = _round_trip(imported)
    assert returned["image"] == str(imported.image) and returned["sha256"] == backed_up.sha256
    assert returned["new_bytes"] == 0 and returned["mounted_rw"] is False

    collected = collect(store)
    assert _round_trip(collected)["images"] == 2

    damaged = backed_up.image / "index"
    digest = damaged.read_text().split()[0]
    (store / "chunks" / digest[:2] / f"{digest}.zst").unlink()
    problems = _round_trip(verify(backed_up.image))
    assert problems["ok"] is False
    assert problems["problems"] == [{"digest": digest, "reason": "missing"}]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", problems["at"])
