"""The job tasks run in-process (Celery's eager apply) on real disk files and a real datastore."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

from django.db import connection
from django.test import TransactionTestCase, override_settings
from engine import MiB, write_random
from support.web import GiB, LabMixin

import imaging.datastore.catalog
import imaging.datastore.image
from webui import services, tasks
from webui.celery import app as celery_app
from webui.models import Disk, Image, Job
from webui.services.delivery import RUN_JOB


class TaskTestCase(LabMixin, TransactionTestCase):
    """Committed rows: a job's heartbeat and cancel watcher read them from their own thread."""

    def setUp(self):
        self.create_lab()
        self.send_task = mock.patch.object(celery_app, "send_task").start()
        # The lab's host: a backup checks that the engine names the disk as the catalog does.
        mock.patch.dict(os.environ, HOST_NAME="h1").start()
        self.addCleanup(mock.patch.stopall)
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.store = self.folder / "store"
        self.datastore = services.datastore_at(self.store)

    def file_disk(self, name: str, path: Path) -> Disk:
        return Disk.objects.create(host=self.h1, stable_id=name, path=str(path), kind="file",
                                   size=path.stat().st_size)


class RunBackupTests(TaskTestCase):
    def setUp(self):
        super().setUp()
        source = self.folder / "disk.img"
        write_random(source, 12 * MiB)
        self.source_sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        self.disk = self.file_disk("file-h1-disk.img", source)

    def test_a_backup_job_runs_the_engine_and_records_state_image_and_progress(self):
        job = services.start_backup(self.disk, self.alice, mode="raw", datastore=self.datastore)
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue="host.h1")
        tasks.run_job.apply(args=[job.pk])
        job.refresh_from_db()
        self.assertEqual(job.state, Job.State.SUCCEEDED, job.error)
        self.assertTrue(job.worker)
        self.assertIsNotNone(job.heartbeat_at)
        image = Image.objects.get()
        self.assertEqual((job.image, image.disk, image.sha256, image.size),
                         (image, self.disk, self.source_sha256, 12 * MiB))
        self.assertEqual(job.result["image"], image.path)
        self.assertEqual([r.path for r in imaging.datastore.catalog.list_images(self.store)], [image.path])
        # The last progress event was saved: a reload shows the job complete.
        self.assertEqual((job.progress["phase"], job.progress["done"], job.progress["total"],
                          job.progress["unit"]), ("backup", 12 * MiB, 12 * MiB, "bytes"))
        self.assertGreater(job.progress["sent_at"], 0)

    def test_changed_chunks_are_stored_as_deltas_unless_the_job_says_not(self):
        source = self.folder / "disk.img"
        bases = []
        for deltas in (True, True, False):
            job = services.start_backup(self.disk, self.alice, mode="raw",
                                        datastore=self.datastore, deltas=deltas)
            tasks.run_job.apply(args=[job.pk])
            job.refresh_from_db()
            self.assertEqual(job.state, Job.State.SUCCEEDED, job.error)
            entries = imaging.datastore.image.Image.open(job.image.path).entries()
            bases.append([entry.base is not None for entry in entries])
            with open(source, "r+b") as disk:  # a few bytes of the middle chunk, for the next
                disk.seek(6 * MiB)
                disk.write(os.urandom(100))
        self.assertEqual(bases, [[False, False, False], [False, True, False],
                                 [False, False, False]])

    def test_a_duplicate_delivery_of_the_message_runs_nothing(self):
        job = services.start_backup(self.disk, self.alice, mode="raw", datastore=self.datastore)
        tasks.run_job.apply(args=[job.pk])
        job.refresh_from_db()
        with mock.patch("imaging.backup.backup") as engine:
            tasks.run_job.apply(args=[job.pk])
        engine.assert_not_called()
        again = Job.objects.get(pk=job.pk)
        self.assertEqual((again.state, again.started, again.finished, again.worker),
                         (job.state, job.started, job.finished, job.worker))
        self.assertEqual(len(os.listdir(self.store / "images" / "file-h1-disk.img")), 1)

    def test_an_engine_failure_fails_the_job_with_its_one_line_reason(self):
        os.unlink(self.disk.path)
        job = services.start_backup(self.disk, self.alice, mode="raw", datastore=self.datastore)
        tasks.run_job.apply(args=[job.pk])
        job.refresh_from_db()
        self.assertEqual(job.state, Job.State.FAILED)
        self.assertIn(f"cannot open source {self.disk.path}", job.error)
        self.assertFalse(Image.objects.exists())


class CancelTests(TaskTestCase):
    def test_a_cancel_reaches_the_running_engine_within_a_second(self):
        source = self.folder / "big.img"
        with open(source, "wb") as handle:
            handle.truncate(64 * GiB)  # sparse: long to read, no room taken
        disk = self.file_disk("file-h1-big.img", source)
        job = services.start_backup(disk, self.alice, mode="raw", datastore=self.datastore)
        runner = threading.Thread(target=self._run, args=(tasks.run_job, job.pk))
        runner.start()
        try:
            self._wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.RUNNING)
            time.sleep(0.5)  # well into the disk
            asked = time.monotonic()
            services.cancel_job(Job.objects.get(pk=job.pk), self.alice)
            self._wait_for(lambda: Job.objects.get(pk=job.pk).state != Job.State.RUNNING)
            stopped = time.monotonic() - asked
        finally:
            runner.join(120)
        job.refresh_from_db()
        self.assertEqual((job.state, job.error), (Job.State.CANCELLED, "cancelled"))
        self.assertLess(stopped, 1.5)
        self.assertFalse(Image.objects.exists())
        self.assertEqual(imaging.datastore.catalog.list_images(self.store), [])

    @staticmethod
    def _run(task, job_id):
        try:
            task.apply(args=[job_id])
        finally:
            connection.close()

    @staticmethod
    def _wait_for(condition, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            time.sleep(0.02)


class RestoreTaskTests(TaskTestCase):
    def test_a_restore_writes_only_to_a_present_disk_of_this_host(self):
        source = self.folder / "source.img"
        write_random(source, 8 * MiB)
        target_file = self.folder / "target.img"
        target_file.write_bytes(bytes(8 * MiB))
        source_disk = self.file_disk("file-h1-source.img", source)
        target_disk = self.file_disk("file-h1-target.img", target_file)
        backup = services.start_backup(source_disk, self.alice, mode="raw", datastore=self.datastore)
        tasks.run_job.apply(args=[backup.pk])
        image = Image.objects.get()
        # This host is h1, and its engine inventory has both files.
        with override_settings(HOST_NAME="h1"), \
                mock.patch.dict(os.environ, HOST_NAME="h1", IMAGING_DISK_FILES=f"{source}:{target_file}"):
            restore = services.start_restore(image, target_disk.pk, target_disk.stable_id, self.alice)
            tasks.run_job.apply(args=[restore.pk])
        restore.refresh_from_db()
        self.assertEqual(restore.state, Job.State.SUCCEEDED, restore.error)
        self.assertEqual(target_file.read_bytes(), source.read_bytes())

    def test_a_restore_onto_a_disk_this_host_no_longer_sees_fails_before_writing(self):
        source = self.folder / "source.img"
        write_random(source, 4 * MiB)
        target_file = self.folder / "target.img"
        target_file.write_bytes(b"\x55" * (4 * MiB))
        source_disk = self.file_disk("file-h1-source.img", source)
        target_disk = self.file_disk("file-h1-target.img", target_file)
        backup = services.start_backup(source_disk, self.alice, mode="raw", datastore=self.datastore)
        tasks.run_job.apply(args=[backup.pk])
        with override_settings(HOST_NAME="h1"), \
                mock.patch.dict(os.environ, HOST_NAME="h1", IMAGING_DISK_FILES=str(source)):
            restore = services.start_restore(Image.objects.get(), target_disk.pk,
                                             target_disk.stable_id, self.alice)
            tasks.run_job.apply(args=[restore.pk])
        restore.refresh_from_db()
        self.assertEqual((restore.state, restore.error),
                         (Job.State.FAILED, "disk file-h1-target.img is not a present disk of host h1 now"))
        self.assertEqual(target_file.read_bytes(), b"\x55" * (4 * MiB))
