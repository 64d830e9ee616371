"""What a restore overwrites and what an image holds: partitions from real disks and real
images, as the inventory, the catalog and the database keep them; and deleting an image."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.test import override_settings
from engine import MiB, write_random
from support.devices import loop_device, requires_loop, requires_root_loop_fuse
from support.disks import PartSpec, build_disk, make_luks
from support.faulty import faulty_disk
from support.web import PLAIN_STATIC, BaseTestCase

import imaging.backup
import imaging.datastore.catalog
import imaging.disks.layout
import imaging.disks.inventory
import imaging.datastore.store
from webui import services
from webui.models import Disk, Image

TWO_PARTITIONS = [PartSpec(24 * MiB, "ext4"), PartSpec(8 * MiB, "swap")]


def inventoried(monkeypatch, path) -> dict:
    monkeypatch.setenv("IMAGING_DISK_FILES", str(path))
    return next(disk for disk in imaging.disks.inventory.inventory()
                if disk["path"] == str(Path(path).resolve()))


def test_the_inventory_lists_a_disk_file_partitions_with_their_filesystems(disk_factory, monkeypatch):
    disk = disk_factory("lab.img", 40 * MiB, "dos", TWO_PARTITIONS)
    found = inventoried(monkeypatch, disk.path)["partitions"]
    assert [(p["name"], p["start"], p["size"], p["fstype"], p["label"]) for p in found] == [
        ("lab.img1", MiB, 24 * MiB, "ext4", "part1"),
        ("lab.img2", 25 * MiB, 8 * MiB, "swap", "part2")]


def test_a_loop_device_without_partition_scanning_still_shows_its_partitions(disk_factory, monkeypatch):
    disk = disk_factory("lab.img", 40 * MiB, "gpt", TWO_PARTITIONS)
    with loop_device(disk.path) as device:
        found = inventoried(monkeypatch, device)["partitions"]
    name = Path(device).name
    assert [(p["name"], p["start"], p["size"], p["fstype"]) for p in found] == [
        (f"{name}p1", MiB, 24 * MiB, "ext4"), (f"{name}p2", 25 * MiB, 8 * MiB, "swap")]


def test_a_filesystem_on_the_whole_disk_is_one_entry_and_an_empty_disk_none(tmp_path, monkeypatch):
    whole = tmp_path / "whole.img"
    whole.write_bytes(b"")
    subprocess.run(["truncate", "-s", "16M", whole], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "scratch", whole], check=True)
    assert inventoried(monkeypatch, whole)["partitions"] == [
        {"name": "whole.img", "start": 0, "size": 16 * MiB, "fstype": "ext4", "label": "scratch"}]
    empty = tmp_path / "empty.img"
    subprocess.run(["truncate", "-s", "16M", empty], check=True)
    assert inventoried(monkeypatch, empty)["partitions"] == []


def test_a_real_disk_partitions_come_from_lsblk_without_reading_the_disk():
    # As `lsblk --json --bytes --output ...` describes a disk with udev's data; the
    # inventory runs every minute and must not spin a sleeping disk up to look.
    device = {"name": "sda", "type": "disk", "size": 2000398934016, "fstype": None,
              "children": [
                  {"name": "sda1", "type": "part", "start": 2048, "size": 536870912,
                   "fstype": "vfat", "label": None, "partlabel": "EFI system partition"},
                  {"name": "sda2", "type": "part", "start": 1050624, "size": 1999860015104,
                   "fstype": "crypto_LUKS", "label": None, "partlabel": None,
                   "children": [{"name": "root", "type": "crypt", "fstype": "ext4"}]}]}
    assert imaging.disks.inventory.listed_partitions(device) == [
        {"name": "sda1", "start": MiB, "size": 536870912, "fstype": "vfat",
         "label": "EFI system partition"},
        {"name": "sda2", "start": 1050624 * 512, "size": 1999860015104, "fstype": "crypto_LUKS",
         "label": None}]
    whole = {"name": "sdb", "type": "disk", "size": 4 * 1024 ** 4, "fstype": "btrfs",
             "label": "tank"}
    assert imaging.disks.inventory.listed_partitions(whole) == [
        {"name": "sdb", "start": 0, "size": 4 * 1024 ** 4, "fstype": "btrfs", "label": "tank"}]
    assert imaging.disks.inventory.listed_partitions({"name": "sdc", "type": "disk", "size": 1}) == []


def test_an_sfdisk_dump_gives_places_in_bytes_types_and_names():
    dump = ("label: gpt\nunit: sectors\nsector-size: 4096\n\n"
            '/dev/sda1 : start=         256, size=       65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, '
            'uuid=4A1B, name="EFI system, partition"\n'
            "/dev/sda2 : start=       65792, size=     1000000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    probed = [{"number": 2, "start": 65792 * 4096, "size": 1000000 * 4096, "filesystem": "ext4",
               "used_bytes": 0, "mapped": "ext4"}]
    assert imaging.disks.layout.parse_dump(dump, 512, probed) == [
        {"name": "sda1", "start": 256 * 4096, "size": 65536 * 4096,
         "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "fstype": None,
         "label": "EFI system, partition"},
        {"name": "sda2", "start": 65792 * 4096, "size": 1000000 * 4096,
         "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "fstype": "ext4", "label": None}]


def test_the_catalog_lists_each_image_partitions_from_its_table(disk_factory, tmp_path):
    disk = disk_factory("lab.img", 40 * MiB, "dos", TWO_PARTITIONS)
    store = tmp_path / "store"
    imaging.backup.backup(str(disk.path), store, disk_id="lab", mode="raw")
    imaging.backup.backup(str(disk.path), store, disk_id="lab", mode="used")
    raw, used = imaging.datastore.catalog.list_images(store)
    assert [(p["start"], p["size"], p["type"], p["fstype"]) for p in raw.partitions] == [
        (MiB, 24 * MiB, "83", None), (25 * MiB, 8 * MiB, "82", None)]
    # A used-mode backup probed each filesystem to know which blocks to read.
    assert [p["fstype"] for p in used.partitions] == ["ext4", "swap"]
    assert raw.bad_ranges == used.bad_ranges == []


def test_an_image_without_a_partition_table_lists_none(tmp_path):
    source = tmp_path / "blank.img"
    write_random(source, 8 * MiB)
    imaging.backup.backup(str(source), tmp_path / "store", disk_id="blank")
    (record,) = imaging.datastore.catalog.list_images(tmp_path / "store")
    assert record.partitions == []


def test_the_catalog_says_where_an_image_could_not_be_read(tmp_path):
    requires_root_loop_fuse()
    healthy = tmp_path / "healthy.img"
    write_random(healthy, 16 * MiB)
    bad = [(5 * MiB, 4096), (12 * MiB + 512, 1024)]
    with faulty_disk(healthy, bad, tmp_path) as device:
        imaging.backup.backup(device, tmp_path / "store", disk_id="faulty")
    (record,) = imaging.datastore.catalog.list_images(tmp_path / "store")
    assert record.bad_ranges == [[5 * MiB, 4096], [12 * MiB + 512, 1024]]


@override_settings(STORAGES=PLAIN_STATIC)
class StoredPartitionsTests(BaseTestCase):
    def setUp(self):
        requires_loop()
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.disk = build_disk(self.folder / "lab.img", 40 * MiB, "gpt", TWO_PARTITIONS)
        self.store = self.folder / "store"

    def test_a_reported_inventory_keeps_each_disk_partitions(self):
        with pytest.MonkeyPatch.context() as patch:
            reported = inventoried(patch, self.disk.path)
        services.report_inventory("h1", "h1@test", [reported])
        disk = Disk.objects.get(stable_id=reported["id"])
        self.assertEqual([(p["start"], p["fstype"], p["label"]) for p in disk.partitions],
                         [(MiB, "ext4", "part1"), (25 * MiB, "swap", "part2")])

    def test_a_rescan_keeps_each_image_partitions_and_the_dialog_shows_them(self):
        imaging.backup.backup(str(self.disk.path), self.store, disk_id="lab", mode="used")
        services.rescan(self.store)
        image = Image.objects.get()
        self.assertEqual([(p["start"], p["size"], p["fstype"]) for p in image.partitions],
                         [(MiB, 24 * MiB, "ext4"), (25 * MiB, 8 * MiB, "swap")])
        self.assertEqual(image.bad_ranges, [])
        self.client.force_login(self.alice)
        html = self.client.get(f"/images/{image.pk}/restore/?fragment=1").content.decode()
        layout = html.split("<div data-image-layout>", 1)[1].split("</section>", 1)[0]
        self.assertIn("<strong>ext4</strong> <span class=\"meta\">Linux filesystem</span>", layout)
        self.assertIn("<strong>swap</strong> <span class=\"meta\">Linux swap</span>", layout)


@override_settings(STORAGES=PLAIN_STATIC)
class DeleteImageTests(BaseTestCase):
    def setUp(self):
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        source = self.folder / "disk.img"
        write_random(source, 8 * MiB)
        self.store = self.folder / "store"
        self.first = imaging.backup.backup(str(source), self.store, disk_id="file-disk.img")
        write_random(source, 8 * MiB, seed=2)
        self.second = imaging.backup.backup(str(source), self.store, disk_id="file-disk.img")
        services.rescan(self.store)
        self.image = Image.objects.get(path=str(self.first.image))
        self.client.force_login(self.alice)

    def test_deleting_an_image_removes_it_from_the_datastore_and_the_history(self):
        response = self.client.post(f"/images/{self.image.pk}/delete/", follow=True)
        self.assertContains(response, "Deleted the image of")
        self.assertFalse(self.first.image.exists())
        self.assertTrue(self.second.image.exists())
        self.assertEqual(list(Image.objects.values_list("path", flat=True)), [str(self.second.image)])
        self.assertEqual([record.path for record in imaging.datastore.catalog.list_images(self.store)],
                         [str(self.second.image)])

    def test_an_image_a_job_uses_is_not_deleted(self):
        job = self.make_job(kind="restore", disk=self.image.disk, image=self.image,
                            target_disk=self.d2)
        response = self.client.post(f"/images/{self.image.pk}/delete/", follow=True)
        self.assertContains(response, f"is in use by restore job #{job.pk} (queued)")
        self.assertTrue(self.first.image.exists())
        self.assertTrue(Image.objects.filter(pk=self.image.pk).exists())

    def test_an_image_a_job_on_another_host_reads_is_not_deleted(self):
        datastore = imaging.datastore.store.Datastore.open(self.store)
        name = f"{self.first.image.parent.name}/{self.first.image.name}"
        with datastore.register("export", "export on h9", images=[name]):
            response = self.client.post(f"/images/{self.image.pk}/delete/", follow=True)
        self.assertContains(response, "is being read by export on h9")
        self.assertTrue(self.first.image.exists())

    def test_an_image_already_gone_from_the_datastore_leaves_the_history(self):
        shutil.rmtree(self.first.image)
        self.client.post(f"/images/{self.image.pk}/delete/")
        self.assertFalse(Image.objects.filter(pk=self.image.pk).exists())


@override_settings(STORAGES=PLAIN_STATIC)
class EncryptedPartitionTests(BaseTestCase):
    def test_an_encrypted_partition_is_said_to_be_stored_in_full_and_why(self):
        requires_loop()
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.store = self.folder / "store"
        disk = build_disk(self.folder / "vault.img", 40 * MiB, "gpt",
                          [PartSpec(24 * MiB, "ext4"), PartSpec(8 * MiB, "raw-noise")])
        make_luks(disk.path, disk.partitions[1], self.folder)
        imaging.backup.backup(str(disk.path), self.store, disk_id="vault", mode="used")
        services.rescan(self.store)
        image = Image.objects.get()
        self.client.force_login(self.alice)
        html = self.client.get(f"/images/{image.pk}/restore/?fragment=1").content.decode()
        layout = html.split("<div data-image-layout>", 1)[1].split("</section>", 1)[0]
        self.assertIn("<strong>crypto_LUKS</strong> <span class=\"meta\">Linux filesystem</span>"
                      "<br><span class=\"meta\">stored in full: encrypted (LUKS2): its files "
                      "need its passphrase</span>", layout)
        files = self.client.get(f"/images/{image.pk}/files/").content.decode()
        self.assertIn("Partition 2 <span class=\"meta\">crypto_LUKS", files)
        self.assertIn("— holds crypto_LUKS, stored in full: encrypted (LUKS2): its files need "
                      "its passphrase</span>", files)
