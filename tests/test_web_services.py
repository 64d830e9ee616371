"""The use cases: refusals, one job per disk, claims, the catalog, job transitions, sweeps.

The engine is real wherever a datastore is involved; Celery's send_task and
Apprise are stood in for (their queue and their messages are what is checked).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import shutil
import tempfile
import threading
from pathlib import Path
from unittest import mock

import apprise
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TransactionTestCase, override_settings
from django.utils import timezone
from engine import MiB, write_random
from support.web import UTC, BaseTestCase, GiB, LabMixin, Outbox

import imaging.backup
import imaging.disks.inventory
from imaging.base.errors import Cancelled, SourceError
from webui import services
from webui.celery import app as celery_app
from webui.models import Datastore, Disk, Host, Image, Job, Protection, Schedule, StatusChange
from webui.services.delivery import RUN_JOB

NOTIFY = ["json://127.0.0.1:9/notify"]


def disk_file(folder: Path, name: str = "disk.img", size: int = 12 * MiB) -> Path:
    """A small disk file: random data, then a zero chunk."""
    path = folder / name
    write_random(path, size - 4 * MiB)
    with open(path, "ab") as handle:
        handle.write(bytes(4 * MiB))
    return path


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ServiceTestCase(BaseTestCase):
    def setUp(self):
        self.send_task = mock.patch.object(celery_app, "send_task").start()
        self.addCleanup(mock.patch.stopall)
        self.outbox = Outbox()
        mock.patch.object(apprise, "Apprise", self.outbox).start()


class InventoryTests(ServiceTestCase):
    def reported(self, **changes):
        disk = {"id": self.d1.stable_id, "path": "/dev/sdb", "type": "disk", "model": "Disk One",
                "serial": "S1", "wwn": "0x5000c500a1b2c3d4", "size": 10 * GiB, "sector_size": 512,
                "mounted": False, "mountpoints": [], "read_only": False, "host": "h1"}
        return dict(disk, **changes)

    def test_a_report_marks_the_host_seen_and_upserts_its_disks_by_stable_id(self):
        seen = timezone.now()
        host = services.report_inventory("h1", "h1@node", [
            self.reported(path="/dev/sdd", mounted=True, mountpoints=["/srv"]),
            self.reported(id="wwn-0x5000c500ffffffff", path="/dev/sde", serial="S3", size=GiB)],
            now=seen)
        self.assertEqual((host, host.worker, host.last_seen), (self.h1, "h1@node", seen))
        self.d1.refresh_from_db()
        self.assertEqual((self.d1.path, self.d1.mounted, self.d1.mountpoints, self.d1.last_seen),
                         ("/dev/sdd", True, ["/srv"], seen))
        new = Disk.objects.get(stable_id="wwn-0x5000c500ffffffff")
        self.assertEqual((new.host, new.serial, new.size, new.present), (self.h1, "S3", GiB, True))

    def test_a_disk_no_longer_reported_is_gone_and_keeps_its_history(self):
        image = self.make_image(disk=self.d2)
        services.report_inventory("h1", "h1@node", [self.reported()])
        self.d2.refresh_from_db()
        self.assertFalse(self.d2.present)
        self.assertEqual(list(self.d2.images.all()), [image])
        services.report_inventory("h1", "h1@node", [self.reported(),
                                                    self.reported(id=self.d2.stable_id, path="/dev/sdz")])
        self.d2.refresh_from_db()
        self.assertEqual((self.d2.present, self.d2.path), (True, "/dev/sdz"))

    def test_a_disk_moved_to_another_host_follows_it(self):
        services.report_inventory("h2", "h2@node", [self.reported(id=self.d2.stable_id)])
        self.d2.refresh_from_db()
        self.assertEqual((self.d2.host.name, self.d2.present), ("h2", True))
        self.d1.refresh_from_db()
        self.assertTrue(self.d1.present)  # h2's report says nothing of h1's disks


class RefusalTests(ServiceTestCase):
    def setUp(self):
        super().setUp()
        self.image = self.make_image(disk=self.d1, size=10 * GiB)

    def refused(self, call, *args, **kwargs) -> str:
        jobs = Job.objects.count()
        with self.assertRaises(services.Refused) as refusal:
            call(*args, **kwargs)
        self.assertEqual(Job.objects.count(), jobs)
        return refusal.exception.message

    def test_a_restore_target_is_a_disk_id_never_a_path(self):
        message = self.refused(services.start_restore, self.image, "/dev/sda", "/dev/sda", self.alice)
        self.assertEqual(message, "target disk must be a disk's id (a number), not '/dev/sda'")

    def test_an_unknown_target_is_refused(self):
        message = self.refused(services.start_restore, self.image, 999999, "x", self.alice)
        self.assertEqual(message, "no target disk with id 999999")

    def test_a_gone_target_is_refused(self):
        Disk.objects.filter(pk=self.d2.pk).update(present=False)
        message = self.refused(services.start_restore, self.image, self.d2.pk,
                               self.d2.stable_id, self.alice)
        self.assertEqual(message, f"target disk {self.d2.stable_id} is gone: "
                                  "host h1 no longer reports it")

    def test_a_target_smaller_than_the_image_is_refused(self):
        image = self.make_image(disk=self.d2, size=20 * GiB)
        message = self.refused(services.start_restore, image, self.d1.pk, self.d1.stable_id,
                               self.alice)
        self.assertEqual(message, f"target disk {self.d1.stable_id} is too small: 10.0 GiB, "
                                  "the image is 20.0 GiB")

    def test_a_confirmation_that_is_not_the_targets_stable_id_is_refused(self):
        for confirm in ("", "yes", self.d1.stable_id, None, self.d2.pk):
            message = self.refused(services.start_restore, self.image, self.d2.pk, confirm,
                                   self.alice)
            self.assertIn(f"confirm with its id {self.d2.stable_id!r}", message)

    def test_a_target_busy_with_another_job_is_refused_naming_it(self):
        backup = self.make_job(disk=self.d2, state=Job.State.RUNNING)
        message = self.refused(services.start_restore, self.image, self.d2.pk,
                               self.d2.stable_id, self.alice)
        self.assertEqual(message, f"disk {self.d2.stable_id} is busy with backup job "
                                  f"#{backup.pk} (running): one job per disk at a time")

    def test_a_backup_of_a_disk_being_restored_onto_is_refused(self):
        restore = self.make_job(kind="restore", target_disk=self.d2, image=self.image)
        message = self.refused(services.start_backup, self.d2, self.alice)
        self.assertIn(f"busy with restore job #{restore.pk} (queued)", message)

    def test_a_finished_job_holds_no_disk(self):
        self.make_job(disk=self.d2, state=Job.State.FAILED)
        with self.captureOnCommitCallbacks(execute=True):
            job = services.start_backup(self.d2, self.alice)
        self.assertEqual(job.state, Job.State.QUEUED)

    def test_a_backup_of_a_gone_disk_and_bad_parameters_are_refused(self):
        Disk.objects.filter(pk=self.d2.pk).update(present=False)
        self.d2.refresh_from_db()
        self.assertIn("is gone", self.refused(services.start_backup, self.d2, self.alice))
        self.assertEqual(self.refused(services.start_backup, self.d1, mode="fast"),
                         "unknown backup mode 'fast': use raw or used")
        self.assertIn("not a zstd level", self.refused(services.start_backup, self.d1, level=40))
        self.assertIn("not a zstd level", self.refused(services.start_backup, self.d1, level="3"))

    def test_export_and_import_names_cannot_leave_their_folders(self):
        self.assertIn("no folders", self.refused(services.start_export, self.image, "../etc/passwd"))
        self.assertIn("inside the import folder",
                      self.refused(services.start_import, ["/etc/shadow"], "disk-a"))
        self.assertIn("inside the import folder",
                      self.refused(services.start_import, ["a/../../b"], "disk-a"))
        self.assertIn("invalid disk id", self.refused(services.start_import, ["a.gz"], "../x"))

    def test_a_prune_that_would_keep_nothing_is_refused(self):
        message = self.refused(services.start_prune, disk=self.d1, retention={"last": 0})
        self.assertEqual(message, "a retention that keeps nothing would remove every image")
        self.assertIn("unknown retention", self.refused(services.start_prune, disk=self.d1,
                                                        retention={"forever": 1}))


class StartTests(ServiceTestCase):
    def test_a_backup_is_enqueued_on_its_disks_host_queue_after_commit(self):
        with self.captureOnCommitCallbacks(execute=False) as callbacks:
            job = services.start_backup(self.d1, self.alice)
            self.send_task.assert_not_called()
        for callback in callbacks:
            callback()
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue="host.h1")
        self.assertEqual((job.kind, job.state, job.host, job.disk, job.requested_by),
                         ("backup", Job.State.QUEUED, self.h1, self.d1, self.alice))
        # Without a mode, the disk's schedule decides: used mode, level 3, its datastore.
        self.assertEqual(job.params, {"mode": "used", "level": 3, "force": False, "deltas": True})
        self.assertEqual(job.datastore, self.datastore)
        self.assertEqual(job.note, "")

    def test_a_restore_runs_on_the_target_disks_host(self):
        h2 = Host.objects.create(name="h2", last_seen=timezone.now())
        target = Disk.objects.create(host=h2, stable_id="file-target.img", size=30 * GiB)
        image = self.make_image(disk=self.d1)
        with self.captureOnCommitCallbacks(execute=True):
            job = services.start_restore(image.pk, str(target.pk), target.stable_id, self.alice)
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue="host.h2")
        self.assertEqual((job.host, job.image, job.disk, job.target_disk),
                         (h2, image, self.d1, target))

    def test_a_job_for_an_offline_host_waits_and_says_so(self):
        Host.objects.filter(pk=self.h1.pk).update(last_seen=timezone.now() - dt.timedelta(hours=1))
        self.d1.host.refresh_from_db()
        with self.captureOnCommitCallbacks(execute=True):
            job = services.start_backup(self.d1, self.alice)
        self.assertEqual(job.state, Job.State.QUEUED)
        self.assertEqual(job.note, "host h1 is offline: the job waits in its queue until its "
                                   "worker is back")
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue="host.h1")
        claimed = services.claim_job(job.pk, "h1@node")
        self.assertEqual(claimed.note, "")

    def test_datastore_jobs_run_where_a_disk_of_the_datastore_is_else_on_this_host(self):
        image = self.make_image(disk=self.d1)
        with self.captureOnCommitCallbacks(execute=True):
            verify = services.start_verify(image, self.alice)
            gc_elsewhere = services.start_gc(Datastore.objects.create(path="/srv/empty"))
        self.assertEqual(verify.host, self.h1)
        self.assertEqual(gc_elsewhere.host.name, settings.HOST_NAME)
        self.send_task.assert_any_call(RUN_JOB, args=[verify.pk], queue="host.h1")


class ClaimAndTransitionTests(ServiceTestCase):
    def test_a_job_is_claimed_once(self):
        job = self.make_job()
        first = services.claim_job(job.pk, "h1@node")
        self.assertIsNotNone(first)
        self.assertEqual((first.state, first.worker), (Job.State.RUNNING, "h1@node"))
        self.assertIsNotNone(first.heartbeat_at)
        self.assertIsNone(services.claim_job(job.pk, "h1@other"))
        job.refresh_from_db()
        self.assertEqual(job.worker, "h1@node")

    def test_cancelling_a_queued_job_stops_it_before_it_starts(self):
        job = self.make_job()
        with self.captureOnCommitCallbacks(execute=True):
            cancelled = services.cancel_job(job, self.alice)
        self.assertEqual(cancelled.state, Job.State.CANCELLED)
        self.assertEqual(cancelled.error, "cancelled by alice before it started")
        self.assertIsNotNone(cancelled.finished)
        self.assertIsNone(services.claim_job(job.pk, "h1@node"))

    def test_cancelling_a_running_job_asks_the_engine_to_stop(self):
        job = services.claim_job(self.make_job().pk, "h1@node")
        asked = services.cancel_job(job, self.alice)
        self.assertEqual((asked.state, asked.cancel_requested), (Job.State.RUNNING, True))
        self.assertEqual(services.job_control(job.pk), (True, True))
        with self.captureOnCommitCallbacks(execute=True):
            stopped = services.fail_job(job, Cancelled())
        self.assertEqual((stopped.state, stopped.error), (Job.State.CANCELLED, "cancelled"))
        self.assertEqual(self.outbox.sent, [])
        with self.assertRaisesMessage(services.Refused, f"job #{job.pk} is cancelled: nothing to cancel"):
            services.cancel_job(stopped, self.alice)

    @override_settings(NOTIFY_URLS=NOTIFY)
    def test_a_failure_is_recorded_notified_and_turns_the_disk_failed(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(notify_urls="ntfy://example/disks")
        job = services.claim_job(self.make_job(schedule=self.schedule).pk, "h1@node")
        with self.captureOnCommitCallbacks(execute=True):
            failed = services.fail_job(job, SourceError("cannot open source /dev/sdb: no such device"))
        self.assertEqual((failed.state, failed.error),
                         (Job.State.FAILED, "cannot open source /dev/sdb: no such device"))
        self.assertEqual(len(self.outbox.sent), 1)
        urls, title, body = self.outbox.sent[0]
        self.assertEqual(urls, (NOTIFY[0], "ntfy://example/disks"))
        self.assertEqual(title, f"Backup job #{job.pk} {self.d1} failed")
        self.assertIn("no such device", body)
        self.d1.refresh_from_db()
        self.assertEqual(self.d1.protection(), Protection.FAILED)
        self.assertLessEqual(self.d1.alert_after, timezone.now())  # the sweeper records the flip
        # A second report of the same end changes nothing.
        self.assertEqual(services.fail_job(job, "again").error,
                         "cannot open source /dev/sdb: no such device")
        self.assertEqual(len(self.outbox.sent), 1)


class ClaimRaceTests(LabMixin, TransactionTestCase):
    def setUp(self):
        self.create_lab()
        mock.patch.object(celery_app, "send_task").start()
        self.addCleanup(mock.patch.stopall)

    def race(self, call, count: int = 2) -> list:
        """Run call(i) in `count` threads released at once; their results or exceptions."""
        start = threading.Barrier(count)
        results: list = [None] * count

        def contender(number):
            try:
                start.wait()
                results[number] = call(number)
            except Exception as exc:
                results[number] = exc
            finally:
                connection.close()

        threads = [threading.Thread(target=contender, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    def test_of_two_requests_for_one_disk_at_once_only_one_starts_a_job(self):
        image = self.make_image(disk=self.d1, size=self.d1.size)
        results = self.race(lambda n: services.start_backup(self.d2, self.alice) if n == 0 else
                            services.start_restore(image, self.d2.pk, self.d2.stable_id, self.alice))
        jobs = [r for r in results if isinstance(r, Job)]
        refusals = [r for r in results if isinstance(r, services.Refused)]
        self.assertEqual((len(jobs), len(refusals)), (1, 1), results)
        self.assertIn("one job per disk at a time", refusals[0].message)
        self.assertEqual(Job.objects.filter(state=Job.State.QUEUED).count(), 1)

    def test_of_two_workers_claiming_one_job_at_once_one_wins(self):
        job = self.make_job()
        results = self.race(lambda n: services.claim_job(job.pk, f"worker{n}@node"), count=4)
        winners = [r for r in results if isinstance(r, Job)]
        self.assertEqual(len(winners), 1, results)
        self.assertEqual(results.count(None), 3)
        job.refresh_from_db()
        self.assertEqual(job.worker, winners[0].worker)


class CatalogTests(ServiceTestCase):
    """rescan and finish_job against a datastore written by a real engine backup."""

    def setUp(self):
        super().setUp()
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.source = disk_file(self.folder)
        self.store = self.folder / "store"

    def test_rescan_builds_the_catalog_from_the_datastore_and_is_idempotent(self):
        result = imaging.backup.backup(str(self.source), self.store, disk_id="file-disk.img")
        change = services.rescan(self.store)
        self.assertEqual((change.images, change.added, change.removed), (1, 1, 0))
        image = Image.objects.get()
        self.assertEqual(image.path, str(result.image))
        self.assertEqual((image.size, image.sha256, image.mode, image.status),
                         (12 * MiB, sha256_file(self.source), "raw", "complete"))
        self.assertEqual(image.stored_bytes, result.stored_bytes)
        # A disk no inventory reported yet: created gone, on the host its manifest names.
        self.assertEqual((image.disk.stable_id, image.disk.present, image.disk.host.name),
                         ("file-disk.img", False, imaging.disks.inventory.host_name()))
        datastore = image.datastore
        self.assertEqual(datastore.path, str(self.store))
        self.assertEqual((datastore.image_count, datastore.logical_bytes, datastore.chunk_count),
                         (1, 12 * MiB, 3))  # two random chunks and the zero chunk
        again = services.rescan(self.store)
        self.assertEqual((again.images, again.added, again.removed), (1, 0, 0))
        self.assertEqual(Image.objects.get().pk, image.pk)

    def test_rescan_drops_images_whose_directory_is_gone_and_keeps_the_disk(self):
        first = imaging.backup.backup(str(self.source), self.store, disk_id="file-disk.img")
        second = imaging.backup.backup(str(self.source), self.store, disk_id="file-disk.img")
        self.assertEqual(services.rescan(self.store).images, 2)
        shutil.rmtree(first.image)
        change = services.rescan(self.store)
        self.assertEqual((change.images, change.added, change.removed), (1, 0, 1))
        self.assertEqual(list(Image.objects.values_list("path", flat=True)), [str(second.image)])
        self.assertTrue(Disk.objects.filter(stable_id="file-disk.img").exists())

    def test_the_rescan_command_prints_what_changed(self):
        imaging.backup.backup(str(self.source), self.store, disk_id="file-disk.img")
        out = io.StringIO()
        call_command("rescan", "--store", str(self.store), stdout=out)
        self.assertEqual(out.getvalue(), f"{self.store}: 1 images, 1 added, 0 removed\n")
        with self.assertRaises(CommandError):
            call_command("rescan", "--store", str(self.folder / "nothing"), stdout=out)

    def test_rescan_of_a_folder_that_is_no_datastore_is_refused(self):
        with self.assertRaises(services.Refused):
            services.rescan(self.folder / "nothing")

    def test_a_finished_backup_records_its_image_and_prunes_by_its_schedule(self):
        datastore = services.datastore_at(self.store)
        Schedule.objects.filter(pk=self.schedule.pk).update(datastore=datastore, keep_last=3)
        self.schedule.refresh_from_db()
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="fresh")
        job = services.claim_job(self.make_job(datastore=datastore, schedule=self.schedule).pk,
                                 "h1@node")
        result = imaging.backup.backup(str(self.source), self.store, disk_id=self.d1.stable_id)
        with self.captureOnCommitCallbacks(execute=True):
            finished = services.finish_job(job, result)
        self.assertEqual(finished.state, Job.State.SUCCEEDED)
        self.assertEqual(finished.result["sha256"], sha256_file(self.source))
        self.assertEqual(finished.image.path, str(result.image))
        self.assertEqual(finished.image.disk, self.d1)
        datastore.refresh_from_db()
        self.assertEqual(datastore.image_count, 1)
        self.d1.refresh_from_db()
        self.assertEqual(self.d1.alert_after, self.d1.going_bad_after())
        prune = Job.objects.get(kind="prune")
        self.assertEqual((prune.disk, prune.datastore, prune.schedule, prune.params["retention"]["last"]),
                         (self.d1, datastore, self.schedule, 3))
        self.send_task.assert_called_once_with(RUN_JOB, args=[prune.pk], queue="host.h1")

    def test_read_errors_or_a_read_write_mount_finish_with_warnings(self):
        datastore = services.datastore_at(self.store)
        job = services.claim_job(self.make_job(datastore=datastore).pk, "h1@node")
        result = imaging.backup.backup(str(self.source), self.store, disk_id=self.d1.stable_id)
        result.bad_bytes, result.mounted_rw = 4096, True
        finished = services.finish_job(job, result)
        self.assertEqual(finished.state, Job.State.SUCCEEDED_WITH_WARNINGS)
        self.assertEqual(finished.error, "4096 unreadable bytes stored as zeros; a partition was "
                                         "mounted read-write while it was read")
        self.assertFalse(Job.objects.filter(kind="prune").exists())


class SweepTests(ServiceTestCase):
    def test_a_running_job_whose_worker_stopped_beating_fails_as_worker_lost(self):
        now = timezone.now()
        silent = self.make_job(state=Job.State.RUNNING, heartbeat_at=now - dt.timedelta(seconds=46))
        beating = self.make_job(disk=self.d2, state=Job.State.RUNNING,
                                heartbeat_at=now - dt.timedelta(seconds=5))
        with self.captureOnCommitCallbacks(execute=True):
            self.assertEqual(services.check_jobs(now=now), (1, 0))
            self.assertEqual(services.check_jobs(now=now), (0, 0))
        silent.refresh_from_db()
        beating.refresh_from_db()
        self.assertEqual((silent.state, silent.error, silent.finished),
                         (Job.State.FAILED, "worker lost", now))
        self.assertEqual(beating.state, Job.State.RUNNING)

    def test_jobs_left_running_by_a_restarted_worker_fail_as_worker_lost(self):
        host = Host.objects.create(name=settings.HOST_NAME)
        mine = self.make_job(host=host, state=Job.State.RUNNING, worker="w@node",
                             heartbeat_at=timezone.now())
        other = self.make_job(disk=self.d2, state=Job.State.RUNNING, worker="x@node",
                              heartbeat_at=timezone.now())
        self.assertEqual(services.fail_jobs_left_running("w@node"), 1)
        mine.refresh_from_db()
        other.refresh_from_db()
        self.assertEqual((mine.state, mine.error), (Job.State.FAILED, "worker lost"))
        self.assertEqual(other.state, Job.State.RUNNING)

    @override_settings(NOTIFY_URLS=NOTIFY, JOB_STALL_SECONDS=300)
    def test_a_stalled_job_is_flagged_and_notified_once(self):
        now = timezone.now()
        job = self.make_job(state=Job.State.RUNNING, heartbeat_at=now,
                            progress_moved_at=now - dt.timedelta(seconds=301),
                            progress={"phase": "backup", "done": 5, "total": 10, "unit": "bytes"})
        self.assertFalse(job.is_stalled(now=now - dt.timedelta(seconds=2)))
        self.assertTrue(job.is_stalled(now=now))
        with self.captureOnCommitCallbacks(execute=True):
            self.assertEqual(services.check_jobs(now=now), (0, 1))
            self.assertEqual(services.check_jobs(now=now), (0, 0))
        job.refresh_from_db()
        self.assertEqual((job.state, job.stall_notified), (Job.State.RUNNING, True))
        self.assertEqual([title for _, title, _ in self.outbox.sent],
                         [f"Backup job #{job.pk} {self.d1} is stalled"])
        self.assertIn("backup: 5 of 10 bytes", self.outbox.sent[0][2])

    @override_settings(NOTIFY_URLS=NOTIFY)
    def test_an_overdue_disk_flips_once_with_one_row_and_one_notification(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(notify_urls="gotify://example/t")
        overdue = dt.datetime(2026, 1, 1, 4, tzinfo=UTC)  # first run 03:00 + 1 h grace
        # As the sweep at the schedule's creation left it: fresh, to look again at 04:00.
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="fresh", alert_after=overdue)
        self.assertEqual(services.check_protection(now=overdue - dt.timedelta(seconds=1)), 0)
        self.assertEqual(services.check_protection(now=overdue), 1)
        self.assertEqual(services.check_protection(now=overdue + dt.timedelta(minutes=1)), 0)
        change = StatusChange.objects.get()
        self.assertEqual((change.disk, change.old, change.new), (self.d1, "fresh", "overdue"))
        self.assertIsNotNone(change.notified_at)
        self.d1.refresh_from_db()
        self.assertEqual((self.d1.protection_state, self.d1.alert_after), ("overdue", None))
        self.assertEqual(len(self.outbox.sent), 1)
        urls, title, body = self.outbox.sent[0]
        self.assertEqual(urls, (NOTIFY[0], "gotify://example/t"))
        self.assertEqual(title, f"Disk {self.d1} is overdue")
        self.assertEqual(body, "The backup scheduled for 2026-01-01 03:00 UTC did not come; "
                               "it has no backup.")

    @override_settings(NOTIFY_URLS=NOTIFY)
    def test_a_backup_after_an_overdue_spell_is_told_as_protected_again(self):
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="overdue", alert_after=None)
        self.make_image(created=timezone.now())
        services.sync_schedule(self.schedule)  # any recompute sees the change and wakes the sweeper
        self.assertEqual(services.check_protection(now=timezone.now()), 1)
        self.assertEqual(StatusChange.objects.get().new, "fresh")
        self.assertEqual([title for _, title, _ in self.outbox.sent],
                         [f"Disk {self.d1} is protected again"])
        self.d1.refresh_from_db()
        self.assertEqual(self.d1.alert_after, self.d1.going_bad_after())

    def test_a_disk_that_turns_due_is_recorded_without_a_notification(self):
        due = dt.datetime(2026, 1, 1, 3, tzinfo=UTC)
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="unscheduled", alert_after=due)
        self.assertEqual(services.check_protection(now=due), 1)
        self.assertEqual(StatusChange.objects.get().new, "due")
        self.assertEqual(self.outbox.sent, [])
