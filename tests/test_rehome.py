"""Rehoming: what an older engine filed under a disk id without its host goes to each host's disk.

The old datastore is made by the real engine, as an older one filled it: two
VMs' /dev/vda (disk files here) backed up night after night into images/dev-vda/,
each manifest naming the host that took it, and one VM's SATA disk under QEMU's
default serial. The old catalog is what that engine's inventories and a rescan
made of it: one Disk row dev-vda, on whichever host reported last, with every image.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from django.apps import apps
from django_celery_beat.models import PeriodicTask
from engine import MiB, imaging as run_imaging, write_random
from support.web import BaseTestCase

import imaging.backup
import imaging.rehome
import imaging.restore
import imaging.datastore.store
from imaging.datastore.image import Image as StoredImage
from imaging.datastore.manifest import Manifest
from webui import services
from webui.models import Disk, Host, Image, Job, Schedule, StatusChange

DISK_SIZE = 8 * MiB


def old_datastore(folder: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The datastore and, for each image folder, (host, SHA-256 of the disk it holds)."""
    store = folder / "store"
    taken = {}
    disks = {host: folder / f"{host}-vda.img" for host in ("vm-a", "vm-b")}
    for night in range(3):
        for number, (host, path) in enumerate(disks.items()):
            write_random(path, DISK_SIZE, seed=10 * night + number)
            taken[_backup(path, store, host, "dev-vda")] = (host, _sha256(path))
    sata = folder / "vm-a-sata.img"
    write_random(sata, DISK_SIZE, seed=99)
    image = _backup(sata, store, "vm-a", "QEMU_HARDDISK_QM00001")
    manifest = StoredImage.open(Path(image)).manifest
    # What lsblk said inside the VM, as its engine recorded it.
    disk = {**manifest.disk, "model": "QEMU HARDDISK", "serial": "QM00001", "path": "/dev/sda"}
    imaging.datastore.store.write_atomically(Path(image) / "manifest.json",
                                   Manifest.from_dict({**manifest.as_dict(), "disk": disk},
                                                      image).as_json().encode())
    taken[image] = ("vm-a", _sha256(sata))
    return store, taken


def _backup(path: Path, store: Path, host: str, disk_id: str) -> str:
    with mock.patch.dict(os.environ, HOST_NAME=host):
        return str(imaging.backup.backup(str(path), store, disk_id=disk_id).image)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def new_id(host: str, old_folder: str) -> str:
    return f"qemu-{host}-QM00001" if old_folder.startswith("QEMU") else f"dev-{host}-vda"


def restored_sha256(image_dir: Path, folder: Path) -> str:
    target = folder / "restored.img"
    target.write_bytes(b"")
    os.truncate(target, DISK_SIZE)
    imaging.restore.restore(image_dir, str(target))
    return _sha256(target)


def assert_rehomed(store: Path, taken: dict[str, tuple[str, str]], folder: Path) -> None:
    """Every image under its host's disk, whole, naming its disk, and restorable byte for byte."""
    images = store / "images"
    expected = {f"{new_id(host, Path(old).parent.name)}/{Path(old).name}"
                for old, (host, _) in taken.items()}
    found = {f"{path.parent.name}/{path.name}" for path in images.glob("*/*")
             if not path.name.startswith(".")}
    assert found == expected
    assert sorted(path.name for path in images.iterdir()) == \
        ["dev-vm-a-vda", "dev-vm-b-vda", "qemu-vm-a-QM00001"]
    for old, (host, sha256) in taken.items():
        image = images / new_id(host, Path(old).parent.name) / Path(old).name
        manifest = StoredImage.open(image).manifest
        assert (manifest.disk["id"], manifest.disk["host"], manifest.sha256) == \
            (image.parent.name, host, sha256)
        recipe = (image / "RESTORE.txt").read_text()
        assert f"#   disk      {image.parent.name}\n" in recipe
        assert f"sh {image}/RESTORE.txt /dev/sdX" in recipe
        assert restored_sha256(image, folder) == sha256


def test_rehome_files_each_image_under_its_hosts_disk_and_keeps_it_restorable(tmp_path):
    store, taken = old_datastore(tmp_path)
    assert sorted(path.name for path in (store / "images").iterdir()) == \
        ["QEMU_HARDDISK_QM00001", "dev-vda"]
    moved = run_imaging("rehome", "--store", store).stdout
    assert moved.splitlines()[-1] == \
        "7 images moved, 0 to move on a later run, 0 left where they are"
    assert_rehomed(store, taken, tmp_path)
    assert run_imaging("rehome", "--store", store).stdout.splitlines() == \
        ["0 images moved, 0 to move on a later run, 0 left where they are"]
    # Garbage collection sees every image where it is now, and deletes none of their chunks.
    run_imaging("gc", "--store", store, "--safety-margin", "0")
    run_imaging("verify", next((store / "images" / "dev-vm-b-vda").iterdir()))
    # The rewritten recipe restores with stock tools from the image's new place.
    image = sorted((store / "images" / "dev-vm-a-vda").iterdir())[-1]
    target = tmp_path / "by-recipe.img"
    target.write_bytes(bytes(DISK_SIZE))
    subprocess.run(["sh", image / "RESTORE.txt", target], check=True, capture_output=True)
    assert _sha256(target) == StoredImage.open(image).manifest.sha256


def test_an_image_being_read_stays_until_its_reader_is_done(tmp_path):
    store, taken = old_datastore(tmp_path)
    read = sorted(taken)[0]
    name = f"{Path(read).parent.name}/{Path(read).name}"
    with imaging.datastore.store.Datastore.open(store).register("restore", f"restore {name}", images=[name]):
        first = imaging.rehome.rehome(store)
        assert os.path.isdir(read)
        assert StoredImage.open(Path(read)).manifest.disk["id"] == Path(read).parent.name  # untouched
    assert (len(first.moved), first.left) == (6, [])
    assert [problem.split(":")[0] for problem in first.deferred] == [read]
    second = imaging.rehome.rehome(store)
    assert (second.moved, second.deferred) == ([(read, str(_new_path(store, read, taken)))], [])
    assert_rehomed(store, taken, tmp_path)


def test_a_run_cut_short_leaves_every_image_whole_and_the_next_one_finishes(tmp_path):
    store, taken = old_datastore(tmp_path)
    renames = []
    real_rename = os.rename

    def crash_at_the_third(source, target):
        renames.append(source)
        if len(renames) == 3:
            raise KeyboardInterrupt("power lost")  # after that image's manifest was rewritten
        real_rename(source, target)

    with mock.patch("imaging.rehome.os.rename", crash_at_the_third), \
            pytest.raises(KeyboardInterrupt):
        imaging.rehome.rehome(store)
    for old in taken:
        places = [path for path in (Path(old), _new_path(store, old, taken)) if path.is_dir()]
        assert len(places) == 1
        assert StoredImage.open(places[0]).manifest.sha256 == taken[old][1]
    assert len(imaging.rehome.rehome(store).moved) == 5
    assert_rehomed(store, taken, tmp_path)


def _new_path(store: Path, old: str, taken) -> Path:
    return store / "images" / new_id(taken[old][0], Path(old).parent.name) / Path(old).name


class CatalogRehomeTests(BaseTestCase):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        self.folder = tmp_path

    def report(self, host: str, disk_id: str) -> None:
        services.report_inventory(host, f"{host}@node", [{
            "id": disk_id, "path": "/dev/vda", "type": "disk", "model": None, "serial": None,
            "wwn": None, "size": DISK_SIZE, "sector_size": 512, "mounted": False,
            "mountpoints": [], "read_only": False}])

    def test_an_old_catalog_and_datastore_become_one_disk_per_host_each_with_its_history(self):
        store, taken = old_datastore(self.folder)
        # The old catalog: a rescan, then each VM's older worker reporting its dev-vda.
        services.rescan(store)
        datastore = services.datastore_at(store)
        self.report("vm-a", "dev-vda")
        self.report("vm-b", "dev-vda")
        old = Disk.objects.get(stable_id="dev-vda")
        self.assertEqual((old.host.name, old.images.count()), ("vm-b", 6))
        vm_a, vm_b = Host.objects.get(name="vm-a"), Host.objects.get(name="vm-b")
        schedule = Schedule.objects.create(disk=old, datastore=datastore, cron="0 3 * * *",
                                           keep_last=5)
        services.sync_schedule(schedule)
        images = {image.path: image for image in Image.objects.filter(datastore=datastore)}
        backups = {path: self.make_job(host=vm_a if taken[path][0] == "vm-a" else vm_b,
                                       disk=image.disk, image=image, datastore=datastore,
                                       state=Job.State.SUCCEEDED)
                   for path, image in images.items()}
        failed = self.make_job(host=vm_a, disk=old, datastore=datastore, state=Job.State.FAILED)
        restore = self.make_job("restore", host=vm_a, disk=old,
                                image=images[next(p for p in taken if taken[p][0] == "vm-b")],
                                target_disk=old, datastore=datastore, state=Job.State.SUCCEEDED)
        flip = StatusChange.objects.create(disk=old, old="fresh", new="overdue")

        # Upgraded: the migration retires the row, the workers report host-qualified ids.
        importlib.import_module("webui.migrations.0005_host_local_disk_ids") \
            .retire_host_less_disks(apps, None)
        self.assertFalse(Disk.objects.get(pk=old.pk).present)
        self.report("vm-a", "dev-vm-a-vda")
        self.report("vm-b", "dev-vm-b-vda")
        disk_a, disk_b = (Disk.objects.get(stable_id=f"dev-{host}-vda")
                          for host in ("vm-a", "vm-b"))

        # The datastore is not mounted: nothing moves, nothing is lost, the rest is handed over.
        store.rename(self.folder / "unmounted")
        store.mkdir()
        services.rehome_host_less_disks()
        self.assertEqual({image.path: (image.pk, image.disk_id)
                          for image in Image.objects.filter(datastore=datastore)},
                         {path: (image.pk, image.disk_id) for path, image in images.items()})
        self.assertTrue(Disk.objects.filter(pk=old.pk).exists())
        self.assertEqual(Job.objects.get(pk=failed.pk).disk, disk_a)
        self.assertEqual(Job.objects.get(pk=restore.pk).target_disk, disk_a)
        self.assertEqual(StatusChange.objects.get(pk=flip.pk).disk, disk_b)
        schedules = Schedule.objects.filter(kind=Schedule.Kind.BACKUP, datastore=datastore)
        self.assertEqual(sorted((s.pk == schedule.pk, s.disk.stable_id, s.keep_last, s.cron)
                                for s in schedules),
                         [(False, "dev-vm-a-vda", 5, "0 3 * * *"),
                          (True, "dev-vm-b-vda", 5, "0 3 * * *")])
        self.assertEqual(sorted(PeriodicTask.objects.filter(
            task="webui.tasks.run_schedule").values_list("args", flat=True)),
            sorted(f"[{s.pk}]" for s in schedules))

        # Mounted again: the next round converges.
        store.rmdir()
        (self.folder / "unmounted").rename(store)
        services.rehome_host_less_disks()
        services.rehome_host_less_disks()  # and a further one changes nothing
        self.assertFalse(Disk.objects.filter(pk=old.pk).exists())
        for path, image in images.items():
            host, sha256 = taken[path]
            now = Image.objects.get(pk=image.pk)
            self.assertEqual((now.path, now.disk.stable_id, now.disk.host.name, now.sha256),
                             (str(_new_path(store, path, taken)),
                              new_id(host, Path(path).parent.name), host, sha256))
            self.assertEqual(Job.objects.get(pk=backups[path].pk).disk, now.disk)
            self.assertEqual(restored_sha256(Path(now.path), self.folder), sha256)
        self.assertEqual(Job.objects.get(pk=restore.pk).disk, disk_b)
        self.assertEqual(Image.objects.filter(datastore=datastore).count(), len(taken))
        for disk, host in ((disk_a, "vm-a"), (disk_b, "vm-b")):
            self.assertEqual(sorted(disk.images.values_list("sha256", flat=True)),
                             sorted(sha for path, (owner, sha) in taken.items()
                                    if owner == host and "dev-vda" in path))
        assert_rehomed(store, taken, self.folder)


def test_an_imported_image_keeps_the_id_it_was_given(tmp_path):
    store, taken = old_datastore(tmp_path)
    classic = tmp_path / "sdb.img"
    write_random(classic, DISK_SIZE, seed=42)
    run_imaging("import", classic, "--store", store, "--disk", "dev-sdb")
    (imported,) = (store / "images" / "dev-sdb").iterdir()
    result = imaging.rehome.rehome(store)
    assert (len(result.moved), result.deferred) == (len(taken), [])
    assert result.left == [f"{imported}: its id was given to the import that made it"]
    assert StoredImage.open(imported).manifest.disk["id"] == "dev-sdb"
    assert restored_sha256(imported, tmp_path) == _sha256(classic)
