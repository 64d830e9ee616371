"""Disk ids: a disk without a hardware identity unique across machines is named with its host.

Every VM's first virtio disk is a serial-less /dev/vda, every VM's first IDE or
SATA disk is QEMU's "QM00001": two hosts reporting one must keep two disks, each
with its own history, and a restore confirmed with one host's id goes to that host.
This machine's own /dev/vda is such a virtio disk (its lsblk data is only read);
QEMU's emulated disks cannot be made here, so lsblk's JSON for them comes from a
stand-in lsblk on the PATH of the real engine.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from django.test import override_settings
from engine import imaging
from support.requirements import requirement_missing
from support.web import MEMORY_LAYER, BaseTestCase, GiB, enqueued

from imaging.disks.inventory import identify
from webui import services
from webui.models import Disk, Job

# What lsblk reports inside a Proxmox VM: an IDE/SATA disk with QEMU's default serial,
# a virtio-scsi disk with the drive's name as serial, and two real disks passed through.
QEMU_LSBLK = {"blockdevices": [
    {"name": "sdq", "path": "/dev/sdq", "kname": "sdq", "type": "disk", "size": 32 * GiB,
     "model": "QEMU HARDDISK", "serial": "QM00001", "wwn": None, "tran": "ata",
     "ro": False, "rm": False, "log-sec": 512, "mountpoints": [None]},
    {"name": "sdr", "path": "/dev/sdr", "kname": "sdr", "type": "disk", "size": 32 * GiB,
     "model": "QEMU HARDDISK", "serial": "drive-scsi0", "wwn": None, "tran": None,
     "ro": False, "rm": False, "log-sec": 512, "mountpoints": [None]},
    {"name": "sds", "path": "/dev/sds", "kname": "sds", "type": "disk", "size": 2000 * GiB,
     "model": "ST2000DM008-2FR102", "serial": "ZFL1ABCD", "wwn": None, "tran": "sata",
     "ro": False, "rm": False, "log-sec": 512, "mountpoints": [None]},
    {"name": "sdt", "path": "/dev/sdt", "kname": "sdt", "type": "disk", "size": 4000 * GiB,
     "model": "ST4000VN008", "serial": "ZDH1WXYZ", "wwn": "0x5000c500a1b2c3d4", "tran": "sata",
     "ro": False, "rm": False, "log-sec": 512, "mountpoints": [None]},
]}


def qemu_inventory(host: str, folder: Path) -> list[dict]:
    """The engine's inventory (`imaging disks`) of a VM named `host` whose lsblk says QEMU_LSBLK."""
    fake = folder / "bin" / "lsblk"
    if not fake.exists():
        fake.parent.mkdir()
        (folder / "lsblk.json").write_text(json.dumps(QEMU_LSBLK))
        fake.write_text(f"#!/bin/sh\nexec cat {folder / 'lsblk.json'}\n")
        fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", HOST_NAME=host,
               IMAGING_DISK_FILES="")
    return json.loads(imaging("disks", env=env).stdout)


def serial_less_disk() -> str:
    """A real disk of this machine with neither WWN nor serial (a VM's virtio /dev/vda)."""
    listed = json.loads(subprocess.run(
        ["lsblk", "--json", "--nodeps", "--output", "PATH,TYPE,SERIAL,WWN"],
        capture_output=True, text=True, check=True).stdout)["blockdevices"]
    found = [disk["path"] for disk in listed if disk["type"] == "disk"
             and not disk["serial"] and not disk["wwn"] and "zram" not in disk["path"]]
    if not found:
        requirement_missing("this machine has no disk without WWN and serial (a virtio disk)")
    return found[0]


def identity_on(host: str, path: str) -> dict:
    """What the engine of a host named `host` says of the disk at `path` (read only)."""
    with mock.patch.dict(os.environ, HOST_NAME=host):
        return identify(path)


def test_a_serial_less_virtio_disk_is_named_with_its_host():
    path = serial_less_disk()
    name = Path(path).name
    assert identity_on("vm-a", path)["id"] == f"dev-vm-a-{name}"
    assert identity_on("vm-b", path)["id"] == f"dev-vm-b-{name}"


def test_qemus_default_serials_are_named_with_their_host_and_real_serials_are_not(tmp_path):
    ids = {host: [disk["id"] for disk in qemu_inventory(host, tmp_path)]
           for host in ("vm-a", "vm-b")}
    assert ids == {
        host: [f"qemu-{host}-QM00001", f"qemu-{host}-drive-scsi0",
               "ST2000DM008-2FR102_ZFL1ABCD", "wwn-0x5000c500a1b2c3d4"]
        for host in ("vm-a", "vm-b")}


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class TwoVirtualMachinesTests(BaseTestCase):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        self.folder = tmp_path

    def report(self, host: str, disks: list[dict]) -> None:
        services.report_inventory(host, f"{host}@node", disks)

    def test_two_hosts_reporting_a_serial_less_vda_keep_two_disks(self):
        path = serial_less_disk()
        self.report("vm-a", [identity_on("vm-a", path)])
        self.report("vm-b", [identity_on("vm-b", path)])
        disks = Disk.objects.filter(path=path).order_by("host__name")
        self.assertEqual([(disk.host.name, disk.present) for disk in disks],
                         [("vm-a", True), ("vm-b", True)])
        self.assertEqual(len({disk.stable_id for disk in disks}), 2)

    def test_two_hosts_reporting_qemus_default_serial_keep_two_disks_and_histories(self):
        self.report("vm-a", qemu_inventory("vm-a", self.folder))
        self.report("vm-b", qemu_inventory("vm-b", self.folder))
        qm = Disk.objects.filter(serial="QM00001").order_by("host__name")
        self.assertEqual([(disk.stable_id, disk.host.name, disk.present) for disk in qm],
                         [("qemu-vm-a-QM00001", "vm-a", True), ("qemu-vm-b-QM00001", "vm-b", True)])
        image = self.make_image(qm[0], size=GiB)
        self.assertEqual([list(disk.images.all()) for disk in qm], [[image], []])
        # A real disk's serial names it on any host: reported by vm-b, it moved there.
        self.assertEqual(Disk.objects.get(serial="ZFL1ABCD").host.name, "vm-b")

    def test_a_restore_is_confirmed_with_the_host_qualified_id_and_runs_on_that_host_only(self):
        self.report("vm-a", qemu_inventory("vm-a", self.folder))
        self.report("vm-b", qemu_inventory("vm-b", self.folder))
        source = Disk.objects.get(stable_id="qemu-vm-a-QM00001")
        target = Disk.objects.get(stable_id="qemu-vm-b-QM00001")
        image = self.make_image(source, size=GiB)
        self.client.force_login(self.alice)
        for confirm in ("QEMU_HARDDISK_QM00001", "qemu-vm-a-QM00001"):
            with self.subTest(confirm=confirm):
                response, sent = self.restore(image, target, confirm)
                self.assertEqual(response.status_code, 400, response.content)
                self.assertIn("qemu-vm-b-QM00001", str(response.json()))
                self.assertEqual((sent, Job.objects.count()), ([], 0))
        response, sent = self.restore(image, target, "qemu-vm-b-QM00001")
        self.assertEqual(response.status_code, 202, response.content)
        job = Job.objects.get(pk=response.json()["job"])
        self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.vm-b")])
        self.assertEqual((job.target_disk, job.host.name), (target, "vm-b"))

    def restore(self, image, target: Disk, confirm: str):
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            response = self.client.post(f"/api/images/{image.pk}/restore/",
                                        {"target_disk": target.pk, "confirm": confirm},
                                        content_type="application/json")
        return response, sent
