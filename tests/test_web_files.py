"""The file browser and downloads of an image, and restoring one partition, on a real
backup of a real disk whose ext4 holds known files.

Listing works for every user; downloading needs staff. A file downloads as itself, a
folder as a tar archive; forged partitions and paths are refused with 400, unknown ids
and paths are 404. A partition restore through the service and the task writes the
partition's bytes and nothing else.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import TransactionTestCase, override_settings
from engine import MiB
from support.devices import loop_device, mounted, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import unmount_own_image_mounts
from support.web import PLAIN_STATIC, BaseTestCase, LabMixin, enqueued
from test_files_kernel_mounted import kernel_mounted
from test_lvm import SRV, build_lvm_disk

import imaging.backup
from imaging.datastore.store import Datastore
from webui import services, tasks
from webui.models import Disk, Image, Job

EXT4_START, EXT4_SIZE = MiB, 24 * MiB
HELLO_MTIME = dt.datetime(2024, 5, 6, 12, 8, 9, tzinfo=dt.timezone.utc)


def known_files() -> dict[str, bytes]:
    rng = random.Random(12)
    return {
        "hello.txt": b"hello from the image\n",
        "docs/report.bin": rng.randbytes(3 * MiB + 123),
        "docs/deep/notes.txt": "über alles, ümlauts & <tags>\n".encode(),
        "docs/empty": b"",
    }


def build_known_disk(folder: Path) -> Path:
    """A dos disk: partition 1 a fresh ext4 holding known_files() and a symlink, then swap."""
    path = folder / "lab.img"
    build_disk(path, 40 * MiB, "dos", [PartSpec(EXT4_SIZE, "raw-noise"), PartSpec(8 * MiB, "swap")])
    with loop_device(path, EXT4_START, EXT4_SIZE) as device:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            device)
        with mounted(device, folder / "mnt") as root:
            for name, data in known_files().items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            (root / "link").symlink_to("hello.txt")
            stamp = HELLO_MTIME.timestamp()
            os.utime(root / "hello.txt", (stamp, stamp))
    return path


def deleted_files_open() -> set[str]:
    """What this process's descriptors open that has no name any more: a copy deleted once
    opened, an unnamed temporary file."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith(" (deleted)"):
                found.add(target)
    return found


def body(response) -> bytes:
    """What the response sends, as an ASGI server takes it: a download's pieces are async."""
    if not response.streaming:
        return response.content

    async def gathered() -> bytes:
        return b"".join([piece async for piece in response.streaming_content])

    return async_to_sync(gathered)()


class UsedImageTestCase(BaseTestCase):
    """One image (used mode, unless `mode` says) of the disk `built` makes, in the catalog,
    for every test."""

    mode = "used"

    @classmethod
    def built(cls, folder: Path) -> Path:
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        requires_root_loop_fuse()
        cls.folder = Path(tempfile.mkdtemp(prefix="web-files-"))
        cls.source = cls.built(cls.folder)
        cls.store = cls.folder / "store"
        imaging.backup.backup(str(cls.source), cls.store, disk_id="lab", mode=cls.mode)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.folder, ignore_errors=True)

    @classmethod
    def setUpTestData(cls):
        super().setUpTestData()
        services.rescan(cls.store)
        cls.image = Image.objects.get()

    def tearDown(self):
        self.assertEqual(unmount_own_image_mounts(self.folder), [])


@override_settings(STORAGES=PLAIN_STATIC)
class FileBrowserTests(UsedImageTestCase):
    built = staticmethod(build_known_disk)

    def folder_url(self, partition="1") -> str:
        return f"/images/{self.image.pk}/files/{partition}/"

    def download_url(self, partition="1") -> str:
        return f"/images/{self.image.pk}/files/{partition}/download/"

    def test_the_disk_page_links_each_image_to_its_files_and_they_list_its_partitions(self):
        self.client.force_login(self.bob)
        page = self.client.get(f"/disks/{self.image.disk_id}/").content.decode()
        self.assertIn(f'href="/images/{self.image.pk}/files/"', page)
        self.assertNotIn("Restore partition", page)
        index = self.client.get(f"/images/{self.image.pk}/files/")
        self.assertEqual(index.status_code, 200)
        self.assertEqual([(p.number, p.fstype, p.readable) for p in index.context["partitions"]],
                         [(1, "ext4", True), (2, "swap", False)])
        html = index.content.decode()
        self.assertIn(f'href="{self.folder_url()}"', html)
        self.assertNotIn(f'href="{self.folder_url("2")}"', html)
        self.assertIn("holds swap: files can be read from ext2, ext3, ext4", html)

    def test_an_encrypted_image_says_why_the_web_lists_no_files(self):
        Image.objects.filter(pk=self.image.pk).update(encrypted=True)
        self.client.force_login(self.alice)
        index = self.client.get(f"/images/{self.image.pk}/files/")
        self.assertEqual([p.readable for p in index.context["partitions"]], [False, False])
        self.assertNotIn(f'href="{self.folder_url()}"', index.content.decode())
        for url in (self.folder_url(), self.download_url()):
            refused = self.client.get(url)
            self.assertEqual(refused.status_code, 400)
            self.assertIn("partition 1 is sealed with its datastore's key, which only the "
                          "workers hold", refused.content.decode())

    def test_a_raw_image_notes_no_filesystems_and_the_engine_probes_them_when_opened(self):
        store = self.folder / "raw-store"
        imaging.backup.backup(str(self.source), store, disk_id="lab-raw")
        services.rescan(store)
        image = Image.objects.get(disk__stable_id="lab-raw")
        self.client.force_login(self.bob)
        index = self.client.get(f"/images/{image.pk}/files/")
        self.assertEqual([(p.number, p.fstype, p.readable) for p in index.context["partitions"]],
                         [(1, None, True), (2, None, True)])
        listing = self.client.get(f"/images/{image.pk}/files/1/")
        self.assertEqual(listing.status_code, 200)
        self.assertIn("hello.txt", [entry.name for entry in listing.context["folder"].entries])
        swap = self.client.get(f"/images/{image.pk}/files/2/")
        self.assertEqual(swap.status_code, 404)
        self.assertIn("partition 2 holds swap: files and extract read ext2, ext3, ext4",
                      swap.content.decode())

    def test_a_viewer_lists_folders_with_names_types_sizes_and_dates(self):
        self.client.force_login(self.bob)
        root = self.client.get(self.folder_url())
        self.assertEqual(root.status_code, 200)
        entries = {entry.name: entry for entry in root.context["folder"].entries}
        self.assertEqual({name: (entry.type, entry.size) for name, entry in entries.items()
                          if name != "lost+found"},
                         {"docs": ("directory", entries["docs"].size),
                          "hello.txt": ("file", 21), "link": ("symlink", 9)})
        self.assertEqual(entries["hello.txt"].mtime, HELLO_MTIME)
        self.assertEqual(entries["link"].target, "hello.txt")
        html = root.content.decode()
        self.assertIn(f'href="{self.folder_url()}?path=docs"', html)
        self.assertIn('<span title="21 bytes">21 bytes</span>', html)
        self.assertNotIn("/download/", html)  # a viewer gets no download links

        deep = self.client.get(self.folder_url(), {"path": "docs/deep"})
        self.assertEqual([(e.name, e.size) for e in deep.context["folder"].entries],
                         [("notes.txt", len(known_files()["docs/deep/notes.txt"]))])
        crumbs = deep.content.decode().split('aria-label="Breadcrumb"', 1)[1].split("</nav>")[0]
        self.assertIn(f'href="{self.folder_url()}?path=docs">docs</a>', crumbs)
        self.assertIn('<span aria-current="page">deep</span>', crumbs)
        docs = self.client.get(self.folder_url(), {"path": "docs"}).context["folder"].entries
        self.assertEqual([(e.name, e.type) for e in docs],
                         [("deep", "directory"), ("empty", "file"), ("report.bin", "file")])
        self.assertEqual([e.size for e in docs[1:]], [0, 3 * MiB + 123])

    def test_a_viewer_may_not_download(self):
        self.client.force_login(self.bob)
        for path in ("hello.txt", "docs", ""):
            self.assertEqual(self.client.get(self.download_url(), {"path": path}).status_code, 403)

    def test_staff_download_a_file_as_its_own_bytes(self):
        self.client.force_login(self.alice)
        listing = self.client.get(self.folder_url(), {"path": "docs"}).content.decode()
        self.assertIn(f'href="{self.download_url()}?path=docs/report.bin"', listing)
        for path, data in known_files().items():
            response = self.client.get(self.download_url(), {"path": path})
            self.assertEqual(response.status_code, 200, path)
            self.assertTrue(response.streaming, path)
            self.assertEqual(response.headers["Content-Length"], str(len(data)), path)
            self.assertEqual(body(response), data, path)
            self.assertIn("attachment", response.headers["Content-Disposition"])
            self.assertIn(Path(path).name, response.headers["Content-Disposition"])

    def test_staff_download_a_folder_as_a_streamed_tar_of_its_files(self):
        self.client.force_login(self.alice)
        response = self.client.get(self.download_url(), {"path": "docs"})
        self.assertEqual(response.status_code, 200)
        self.assertIsInstance(response, StreamingHttpResponse)
        self.assertEqual(response.headers["Content-Type"], "application/x-tar")
        self.assertIn('filename="docs.tar"', response.headers["Content-Disposition"])
        with tarfile.open(fileobj=io.BytesIO(body(response)), mode="r:") as archive:
            members = {member.name: member for member in archive.getmembers()}
            self.assertEqual(set(members), {"docs", "docs/deep", "docs/deep/notes.txt",
                                            "docs/report.bin", "docs/empty"})
            self.assertTrue(members["docs/deep"].isdir())
            for path, data in known_files().items():
                if path.startswith("docs/"):
                    self.assertEqual(archive.extractfile(members[path]).read(), data, path)
        whole = self.client.get(self.download_url(), {"path": ""})
        with tarfile.open(fileobj=io.BytesIO(body(whole)), mode="r:") as archive:
            members = {member.name: member for member in archive.getmembers()}
            self.assertEqual(archive.extractfile(members["partition-1/hello.txt"]).read(),
                             known_files()["hello.txt"])
            self.assertEqual(members["partition-1/link"].linkname, "hello.txt")

    def test_each_listing_and_download_opens_the_image_once(self):
        """One engine file session per request: the image's reader registers once, however
        many folders and files a tar holds."""
        self.client.force_login(self.alice)
        requests = [(self.folder_url(), ""), (self.folder_url(), "docs/deep"),
                    (self.download_url(), "docs/report.bin"), (self.download_url(), "docs"),
                    (self.download_url(), "")]
        with mock.patch.object(Datastore, "register", autospec=True,
                               side_effect=Datastore.register) as registered:
            for url, path in requests:
                registered.reset_mock()
                response = self.client.get(url, {"path": path})
                self.assertEqual(response.status_code, 200, (url, path))
                body(response)
                self.assertEqual(registered.call_count, 1, (url, path))

    def test_a_file_downloads_from_the_image_with_no_copy_of_it_anywhere(self):
        before = deleted_files_open()
        download = services.files.download(self.image, "1", "docs/report.bin", self.alice.pk)
        try:
            pieces = [next(download.pieces)]
            self.assertEqual(deleted_files_open(), before)
            pieces.extend(download.pieces)
        finally:
            download.close()
        self.assertEqual(b"".join(pieces), known_files()["docs/report.bin"])

    def test_forged_partitions_and_paths_are_refused_with_400(self):
        self.client.force_login(self.alice)
        forged = ["../etc", "/etc", "docs/../..", "docs/..", "./docs", "docs//deep", "a\0b",
                  "hello.txt" + "/x" * 3000]
        for url in (self.folder_url(), self.download_url()):
            for path in forged:
                self.assertEqual(self.client.get(url, {"path": path}).status_code, 400, (url, path))
            self.assertEqual(self.client.get(url, {"path": ["docs", "hello.txt"]}).status_code,
                             400, url)
        for partition in ("9", "0", "2", "abc", "1.0", "-1", "99999999999"):
            for url in (self.folder_url(partition), self.download_url(partition)):
                self.assertEqual(self.client.get(url, {"path": ""}).status_code, 400,
                                 (url, partition))
        self.assertEqual(self.client.get(self.folder_url(), {"path": "hello.txt"}).status_code,
                         400)

    def test_unknown_images_and_paths_are_404(self):
        self.client.force_login(self.alice)
        unknown = f"/images/{self.image.pk + 100}/files"
        for url in (f"{unknown}/", f"{unknown}/1/", f"{unknown}/1/download/?path=hello.txt"):
            self.assertEqual(self.client.get(url).status_code, 404, url)
        missing = self.client.get(self.folder_url(), {"path": "no-such-folder"})
        self.assertEqual(missing.status_code, 404)
        self.assertIn("no such file or directory", missing.content.decode())
        self.assertEqual(self.client.get(self.download_url(), {"path": "docs/nope"}).status_code,
                         404)

    def test_staff_see_restore_partition_beside_restore_and_its_form(self):
        self.client.force_login(self.alice)
        page = self.client.get(f"/disks/{self.image.disk_id}/").content.decode()
        row = page.split(f'data-image-id="{self.image.pk}"', 1)[1].split("</tr>", 1)[0]
        self.assertLess(row.index('data-action="restore"'),
                        row.index('data-action="restore-partition"'))
        form = self.client.get(f"/images/{self.image.pk}/restore-partition/?fragment=1")
        self.assertEqual(form.status_code, 200)
        html = form.content.decode()
        self.assertIn(f'<option value="1" data-size="{EXT4_SIZE}">', html)
        self.assertIn('name="target_disk"', html)
        self.client.force_login(self.bob)
        self.assertEqual(self.client.get(f"/images/{self.image.pk}/restore-partition/").status_code,
                         403)


class PartitionRestoreTests(LabMixin, TransactionTestCase):
    """Committed rows: a job's heartbeat and cancel watcher read them from their own thread."""

    def setUp(self):
        requires_root_loop_fuse()
        self.create_lab()
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.source = build_known_disk(self.folder)
        self.store = self.folder / "store"
        imaging.backup.backup(str(self.source), self.store, disk_id="lab", mode="raw")
        services.rescan(self.store)
        self.image = Image.objects.get()

    def file_disk(self, path: Path) -> Disk:
        return Disk.objects.create(host=self.h1, stable_id=f"file-h1-{path.name}", path=str(path),
                                   kind="file", size=path.stat().st_size)

    def test_a_partition_restore_writes_that_partition_onto_the_target(self):
        target_file = self.folder / "target.img"
        target_file.write_bytes(b"\xee" * (EXT4_SIZE + MiB))
        target = self.file_disk(target_file)
        with enqueued() as sent, override_settings(HOST_NAME="h1"), \
                mock.patch.dict(os.environ, HOST_NAME="h1", IMAGING_DISK_FILES=str(target_file)):
            job = services.start_restore(self.image, target.pk, target.stable_id, self.alice,
                                         partition=1)
            self.assertEqual(job.params, {"verify": True, "partition": 1})
            self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.h1")])
            tasks.run_job.apply(args=[job.pk])
        job.refresh_from_db()
        self.assertEqual(job.state, Job.State.SUCCEEDED, job.error)
        written = target_file.read_bytes()
        with open(self.source, "rb") as source:
            source.seek(EXT4_START)
            self.assertEqual(written[:EXT4_SIZE], source.read(EXT4_SIZE))
        self.assertEqual(written[EXT4_SIZE:], bytes(MiB))  # a file target is emptied first

    def test_a_target_smaller_than_the_partition_or_a_forged_partition_is_refused(self):
        small_file = self.folder / "small.img"
        small_file.write_bytes(bytes(EXT4_SIZE - MiB))
        small = self.file_disk(small_file)
        with enqueued() as sent:
            with self.assertRaisesRegex(services.Refused,
                                        "too small: 23.0 MiB, partition 1 is 24.0 MiB"):
                services.start_restore(self.image, small.pk, small.stable_id, partition=1)
            for forged, message in ((7, "no partition 7 .its partitions: 1, 2."),
                                    ("1", "named by its number"), (True, "named by its number")):
                with self.assertRaisesRegex(services.Refused, message):
                    services.start_restore(self.image, self.d2.pk, self.d2.stable_id,
                                           partition=forged)
            # The swap partition is 8 MiB: the small disk takes it.
            job = services.start_restore(self.image, small.pk, small.stable_id, partition=2)
        self.assertEqual(job.params["partition"], 2)
        self.assertEqual(len(sent), 1)

    def test_the_api_takes_an_optional_partition(self):
        self.client.force_login(self.alice)
        url = f"/api/images/{self.image.pk}/restore/"
        with enqueued():
            bad = self.client.post(url, {"target_disk": self.d2.pk, "confirm": self.d2.stable_id,
                                         "partition": "1"}, content_type="application/json")
            self.assertEqual(bad.status_code, 400)
            started = self.client.post(url, {"target_disk": self.d2.pk,
                                             "confirm": self.d2.stable_id, "partition": 1},
                                       content_type="application/json")
        self.assertEqual(started.status_code, 202, started.content)
        self.assertEqual(Job.objects.get(kind="restore").params,
                         {"verify": True, "partition": 1})


@override_settings(STORAGES=PLAIN_STATIC)
class LogicalVolumeBrowserTests(UsedImageTestCase):
    """A used-mode image of an LVM disk: each logical volume is browsed as a partition is,
    addressed as VG-LV, as the image's view names it."""

    @classmethod
    def built(cls, folder: Path) -> Path:
        cls.disk = build_lvm_disk(folder)
        return cls.disk.path

    def test_each_volume_is_listed_browsed_and_downloaded_as_vg_lv(self):
        self.client.force_login(self.alice)
        index = self.client.get(f"/images/{self.image.pk}/files/")
        html = index.content.decode()
        for name in ("home", "root", "srv"):
            self.assertEqual(html.count(f'<a href="/images/{self.image.pk}/files/vg0-{name}/">'
                                        f'Volume vg0/{name}</a>'), 1)
        srv = self.client.get(f"/images/{self.image.pk}/files/vg0-srv/", {"path": "www"})
        self.assertEqual(srv.status_code, 200)
        self.assertEqual([entry.name for entry in srv.context["folder"].entries], ["index.html"])
        self.assertIn("<h1>Volume vg0/srv: /www</h1>", srv.content.decode())
        pv = self.disk.partitions[1]
        with loop_device(self.disk.path, SRV.offset(pv.start), SRV.size, read_only=True) as device:
            point = kernel_mounted(device, "xfs", self.folder / "srv", read_only=True)
            try:
                original = (point / "www" / "index.html").read_bytes()
            finally:
                run("umount", point)
        download = self.client.get(f"/images/{self.image.pk}/files/vg0-srv/download/",
                                   {"path": "www/index.html"})
        self.assertEqual(body(download), original)
        missing = self.client.get(f"/images/{self.image.pk}/files/vg0-swap/")
        self.assertEqual(missing.status_code, 400)
        self.assertEqual(missing.content.decode(),
                         "the image has no logical volume vg0-swap whose files can be listed")
        # A partition restore offers partitions, never a volume.
        dialog = self.client.get(f"/images/{self.image.pk}/restore-partition/")
        self.assertNotIn("vg0", dialog.content.decode())


@override_settings(STORAGES=PLAIN_STATIC)
class RawLogicalVolumeBrowserTests(UsedImageTestCase):
    """A raw-mode image of an LVM disk: its manifest lists no volumes, so the file browser
    reads them from the image."""

    mode = "raw"

    @classmethod
    def built(cls, folder: Path) -> Path:
        cls.disk = build_lvm_disk(folder)
        return cls.disk.path

    def test_volumes_are_read_from_the_image_and_the_pv_names_them(self):
        self.assertFalse(any(part.get("volumes") for part in self.image.partitions))
        self.client.force_login(self.alice)
        html = self.client.get(f"/images/{self.image.pk}/files/").content.decode()
        for name in ("home", "root", "srv"):
            self.assertIn(f'<a href="/images/{self.image.pk}/files/vg0-{name}/">Volume vg0/'
                          f'{name}</a>', html)
        srv = self.client.get(f"/images/{self.image.pk}/files/vg0-srv/", {"path": "www"})
        self.assertEqual([entry.name for entry in srv.context["folder"].entries], ["index.html"])
        pv = self.client.get(f"/images/{self.image.pk}/files/2/")
        self.assertEqual(pv.status_code, 404)
        self.assertEqual(pv.context["problem"],
                         "partition 2 is an LVM2 physical volume: name one of its linear "
                         "logical volumes instead (vg0/home, vg0/root, vg0/srv)")
