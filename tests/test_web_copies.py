"""Copies in the dashboard: remotes on the datastores page, copy schedules (cron or after each
backup) run by a worker with live progress, where each disk's newest image has copies, and
the off-site rule of a schedule in "is every disk protected?"."""
from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
import subprocess
import sys
from unittest import mock

from django.test import override_settings
from django.utils import timezone
from engine import MiB, REPO, write_random
from support.remotes import webdav_server
from support.services import wait_for
from support.web import MEMORY_LAYER, PLAIN_STATIC, UTC, BaseTestCase, enqueued
from support.webhook import Webhook

from webui import pages, services
from webui.models import Datastore, Disk, Image, ImageCopy, Job, Protection, Schedule, StatusChange
from webui.services.registry import KINDS

SECRET_REMOTE = "rclone::webdav,url='http://127.0.0.1:9',user=backup,pass=hunter2secret:store"


def utc(*parts):
    return dt.datetime(*parts, tzinfo=UTC)


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class RemoteTests(BaseTestCase):
    def test_staff_add_a_remote_and_nobody_sees_its_secrets(self):
        self.client.force_login(self.alice)
        added = self.client.post("/datastores/remotes/", {
            "path": SECRET_REMOTE, "label": "dav", "bwlimit": "8M", "offsite": "on"})
        self.assertRedirects(added, "/datastores/", fetch_redirect_response=False)
        remote = Datastore.objects.get(label="dav")
        self.assertEqual((remote.path, remote.offsite, remote.bwlimit, remote.is_remote),
                         (SECRET_REMOTE, True, "8M", True))
        for user in (self.alice, self.bob):
            self.client.force_login(user)
            page = self.client.get("/datastores/").content.decode()
            self.assertIn("rclone::webdav,url=&#x27;http://127.0.0.1:9&#x27;,user=***,pass=***:store",
                          page)
            listed = self.client.get("/api/datastores/").json()
            self.assertNotIn("hunter2secret", page + str(listed))
            self.assertNotIn("backup", str(listed))
            self.assertIn({"label": "dav", "remote": True, "offsite": True, "bwlimit": "8M"},
                          [{key: store[key] for key in ("label", "remote", "offsite", "bwlimit")}
                           for store in listed["results"]])

    def test_a_viewer_or_a_stranger_adds_no_remote_and_starts_no_copy(self):
        remote = services.add_remote("rclone:b2:bucket", label="b2")
        self.client.force_login(self.bob)
        self.assertEqual(self.client.post("/datastores/remotes/",
                                          {"path": "rclone:x:y"}).status_code, 403)
        self.assertEqual(self.client.post(f"/datastores/{self.datastore.pk}/sync/",
                                          {"destination": remote.pk}).status_code, 403)
        self.client.logout()
        for path in ("/datastores/remotes/", f"/datastores/{self.datastore.pk}/sync/"):
            response = self.client.post(path, {"path": "rclone:x:y", "destination": remote.pk})
            self.assertEqual(response.status_code, 302)
            self.assertTrue(response["Location"].startswith("/accounts/login/"))
        self.assertEqual(list(Datastore.objects.filter(path="rclone:x:y")), [])
        self.assertFalse(Job.objects.exists())

    def test_a_bad_remote_is_one_line_and_adds_nothing(self):
        self.client.force_login(self.alice)
        services.add_remote("rclone:b2:bucket")
        services.add_remote("rclone:myssh:bucket")  # a configured remote's name is its own
        for fields, message in [
                ({"path": "/srv/other"}, "a remote starts with rclone:"),
                ({"path": "rclone:"}, "name the remote after rclone:"),
                ({"path": "rclone:--config=/etc/shadow"}, "it starts with - or holds a control"),
                ({"path": "rclone:b2:x", "bwlimit": "fast"}, "bandwidth limit 'fast'"),
                ({"path": "rclone:b2:x", "bwlimit": "1" * 40}, "bandwidth limit '111"),
                ({"path": "rclone::local:/etc"}, "backend 'local': a copy goes to a storage"),
                ({"path": "rclone::alias,remote=/root:x"}, "backend 'alias'"),
                ({"path": "rclone::webdav,url=http://h,bearer_token_command=id:x"},
                 "may not run a command on the worker's host"),
                ({"path": "rclone:nas,ssh='id':x"}, "may not run a command on the worker's host"),
                ({"path": "rclone::sftp,host=h,ssh:x"}, "may not run a command"),
                ({"path": "rclone:myssh:bucket"}, "rclone:myssh:bucket is a datastore already"),
                ({"path": "rclone:b2:" + "x" * 2000}, "longer than 1024 characters"),
                ({"path": "rclone:b2:x", "label": "<script>"}, "name '<script>'"),
                ({"path": "rclone:b2:bucket"}, "rclone:b2:bucket is a datastore already")]:
            page = self.client.post("/datastores/remotes/", fields, follow=True)
            self.assertEqual(page.status_code, 200)
            said = re.findall(r'<p class="message error">(.*?)</p>', page.content.decode())
            self.assertEqual(len(said), 1, fields)
            self.assertTrue(said[0].startswith("No remote added: "), said)
            self.assertIn(message, html.unescape(said[0]))
        self.assertEqual(Datastore.objects.filter(path__startswith="rclone:").count(), 2)
        for junk in ("²", "1" * 40, "", "-1"):
            page = self.client.post(f"/datastores/{self.datastore.pk}/sync/",
                                    {"destination": junk}, follow=True)
            self.assertEqual(page.status_code, 200)
            self.assertIn("No copy: choose the datastore to copy to.", page.content.decode())

    def test_a_copy_starts_from_a_folder_to_another_datastore_only(self):
        remote = services.add_remote("rclone:b2:bucket")
        self.make_image()  # the datastore's host: one with a disk imaged there
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            job = services.start_sync(self.datastore, remote, self.alice)
            for source, destination, refusal in [
                    (self.datastore, self.datastore, "no copy of itself"),
                    (remote, self.datastore, "is an rclone: remote, which copies fill")]:
                with self.assertRaisesRegex(services.Refused, refusal):
                    services.start_sync(source, destination, self.alice)
            with self.assertRaisesRegex(services.Refused, "rclone:b2:bucket is an rclone: "
                                                          "remote, which copies fill"):
                services.start_gc(remote, self.alice)
        self.assertEqual((job.kind, job.datastore, job.destination, job.host), ("sync", self.datastore,
                                                                              remote, self.h1))
        self.assertEqual(len(sent), 1)
        self.assertEqual(KINDS["sync"].describe(job), "Copy from /srv/datastore to rclone:b2:bucket")


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class CopyScheduleTests(BaseTestCase):
    def setUp(self):
        super().setUp()
        self.remote = services.add_remote("rclone:b2:bucket", label="b2-bucket")
        self.client.force_login(self.alice)

    def test_a_copy_schedule_names_another_datastore_through_the_form_and_the_api(self):
        form = {"kind": "sync", "datastore": self.datastore.pk, "destination": self.remote.pk,
                "after_backup": "on", "copy_last": 5, "cron": "0 5 * * *", "time_zone": "UTC",
                "mode": "used", "level": 3, "keep_last": 7, "keep_hourly": 0, "keep_daily": 14,
                "keep_weekly": 8, "keep_monthly": 12, "keep_yearly": 0, "grace_minutes": 60,
                "enabled": "on"}
        response = self.client.post("/schedules/new/", form)
        self.assertEqual(response.status_code, 302, response.content.decode()[:3000])
        schedule = Schedule.objects.get(kind="sync")
        self.assertEqual((schedule.datastore, schedule.destination, schedule.after_backup,
                          schedule.copy_last), (self.datastore, self.remote, True, 5))
        self.assertIn("Copy <code>/srv/datastore</code> to b2-bucket",
                      self.client.get("/schedules/").content.decode())
        for body, field in [({"kind": "sync", "datastore": self.datastore.pk}, "destination"),
                            ({"kind": "sync", "datastore": self.datastore.pk,
                              "destination": self.datastore.pk}, "destination"),
                            ({"kind": "sync", "datastore": self.remote.pk,
                              "destination": self.datastore.pk}, "datastore"),
                            ({"kind": "gc", "datastore": self.datastore.pk,
                              "destination": self.remote.pk}, "destination")]:
            refused = self.client.post("/api/schedules/", body, content_type="application/json")
            self.assertEqual(refused.status_code, 400, body)
            self.assertIn(field, refused.json(), body)

    def test_each_backup_of_the_datastore_starts_its_after_backup_copies(self):
        Schedule.objects.create(kind="sync", datastore=self.datastore, destination=self.remote,
                                after_backup=True, copy_last=3)
        Schedule.objects.create(kind="sync", datastore=self.datastore, destination=self.remote,
                                after_backup=False)
        backup = self.make_job(state=Job.State.SUCCEEDED, schedule=self.schedule)
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            KINDS["backup"].follow_up(backup)
        copy = Job.objects.get(kind="sync")
        self.assertEqual((copy.datastore, copy.destination, copy.disk, copy.params),
                         (self.datastore, self.remote, self.d1, {"last": 3}))
        self.assertEqual(sorted(message[1][0] for message in sent),
                         sorted(Job.objects.filter(kind__in=["sync", "prune"])
                                .values_list("pk", flat=True)))

    def test_a_finished_copy_records_which_images_the_destination_holds(self):
        Datastore.objects.filter(pk=self.datastore.pk).update(fingerprint="abcd-ef01-2345-6789")
        old = self.make_image(created=utc(2026, 3, 9, 3))
        new = self.make_image(created=utc(2026, 3, 10, 3))
        other = self.make_image(self.d2, created=utc(2026, 3, 10, 3))
        # Copied before, since pruned at the destination: the sync's listing says so.
        ImageCopy.objects.create(image=other, datastore=self.remote, synced_at=utc(2026, 3, 9))
        job = self.make_job("sync", Job.State.RUNNING, datastore=self.datastore,
                            destination=self.remote, started=utc(2026, 3, 10, 4))
        services.finish_job(job, {"source": "/srv/datastore", "destination": "rclone:b2:bucket",
                                  "copied": [f"{self.d1.stable_id}/{new.stamp}"],
                                  "present": [f"{self.d1.stable_id}/{old.stamp}"],
                                  "held": [f"{self.d1.stable_id}/{old.stamp}",
                                           f"{self.d1.stable_id}/{new.stamp}",
                                           "disk-of-another-store/2026-01-01T00-00-00Z"],
                                  "chunks_sent": 3, "bytes_sent": 12 * MiB,
                                  "chunks_present": 9, "seconds": 2.0}, now=utc(2026, 3, 10, 5))
        self.assertEqual(sorted(ImageCopy.objects.values_list("image_id", "datastore_id",
                                                              "synced_at")),
                         [(old.pk, self.remote.pk, utc(2026, 3, 10, 4)),
                          (new.pk, self.remote.pk, utc(2026, 3, 10, 4))])
        self.assertFalse(other.copies.exists())
        self.remote.refresh_from_db()
        self.assertEqual(self.remote.fingerprint, "abcd-ef01-2345-6789")
        job.refresh_from_db()
        self.assertEqual(KINDS["sync"].result_lines(job.result),
                         ["Copied 1 image(s); 1 were there already",
                          "Sent 3 chunks (12.0 MiB); 9 were there already"])
        page = self.client.get("/datastores/").content.decode()
        self.assertRegex(page, r'data-copy-to="%d"><strong>b2-bucket</strong> <span class="meta">off '
                               r'site</span> · last in sync <time' % self.remote.pk)
        self.assertIn("sealed with key <code>abcd-ef01-2345-6789</code>", page)
        disk_page = self.client.get(f"/disks/{self.d1.pk}/").content.decode()
        self.assertRegex(disk_page, r"On site: /srv/datastore; off site: b2-bucket, <time")
        self.assertIn("no off-site copy", self.client.get(f"/disks/{self.d2.pk}/").content.decode())


class OffsiteRuleTests(BaseTestCase):
    """The backup schedule (daily at 03:00 UTC, grace 1 h) asks for an off-site copy within
    26 h: an image copied off site counts from when it was taken."""

    def setUp(self):
        super().setUp()
        Schedule.objects.filter(pk=self.schedule.pk).update(offsite_within=dt.timedelta(hours=26))
        self.offsite = services.add_remote("rclone:b2:bucket", label="b2", offsite=True)
        self.onsite = services.add_remote("rclone:nas:copy", label="nas", offsite=False)

    def image_copied(self, created, *to):
        image = self.make_image(created=created)
        for store in to:
            ImageCopy.objects.create(image=image, datastore=store, synced_at=created)
        return image

    def test_a_disk_backed_up_daily_without_an_off_site_copy_is_flagged(self):
        self.image_copied(utc(2026, 3, 10, 3), self.offsite)
        self.image_copied(utc(2026, 3, 11, 3), self.onsite)  # on site only
        self.assertEqual(self.d1.last_offsite_at(), utc(2026, 3, 10, 3))
        self.assertEqual(self.d1.going_bad_after(), utc(2026, 3, 11, 5))
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 4)), Protection.FRESH)
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 5)), Protection.NO_OFFSITE)
        self.assertFalse(Protection.NO_OFFSITE.protected)
        status = pages.disk_status(pages.with_last_image(Disk.objects.all()).get(pk=self.d1.pk),
                                   now=utc(2026, 3, 11, 5))
        self.assertEqual((status.tone, status.label), ("bad", "No off-site copy"))
        self.assertEqual(status.notes, ["no off-site copy newer than 26 h 00 min"])

    def test_an_overdue_backup_is_told_first_and_a_fresh_copy_clears_the_flag(self):
        self.image_copied(utc(2026, 3, 10, 3), self.offsite)
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 4)), Protection.OVERDUE)
        self.image_copied(utc(2026, 3, 11, 3), self.offsite)
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 5)), Protection.FRESH)

    def test_the_sweeper_flips_and_tells_once(self):
        self.image_copied(utc(2026, 3, 10, 3), self.offsite)
        self.image_copied(utc(2026, 3, 11, 3))
        Disk.objects.filter(pk=self.d1.pk).update(protection_state=Protection.FRESH,
                                                  alert_after=utc(2026, 3, 11, 5))
        with mock.patch("webui.services.protection.notify") as notify:
            self.assertEqual(services.check_protection(now=utc(2026, 3, 11, 5)), 1)
            self.assertEqual(services.check_protection(now=utc(2026, 3, 11, 6)), 0)
        self.assertEqual(StatusChange.objects.get().new, Protection.NO_OFFSITE)
        self.assertEqual([call.args[:2] for call in notify.call_args_list], [(f"Disk {self.d1} has no recent off-site copy",
                                 "Its schedule asks for an off-site copy within 26 h 00 min; its "
                                 "newest off-site copy is of the image from 2026-03-10 03:00 UTC.")])


def test_a_backup_and_its_copy_to_a_webdav_remote_run_on_the_worker_and_restore_identical(
        host_name, celery_worker, live_environment, tmp_path):
    """The disaster drill from the dashboard's side: a backup, the copy its schedule starts
    after it (live progress, a failure told through Apprise), the copy restored byte for byte."""
    disk_file = tmp_path / "disk.img"
    write_random(disk_file, 24 * MiB, seed=4)
    worker = celery_worker(host_name, disk_files=[disk_file])
    disk = wait_for(lambda: Disk.objects.filter(path=str(disk_file), present=True).first(),
                    "the disk file in the worker's inventory", 30, worker)
    store = services.datastore_at(live_environment["IMAGING_DATASTORE"])
    hook = Webhook()
    try:
        with webdav_server(tmp_path) as (served, remote):
            copy_to = services.add_remote(remote, label="dav", bwlimit="100M")
            dead = services.add_remote("rclone::webdav,url='http://127.0.0.1:9':store",
                                       label="dead")
            for destination in (copy_to, dead):
                Schedule.objects.create(kind="sync", datastore=store, destination=destination,
                                        after_backup=True, notify_urls=hook.url)
            backup = services.start_backup(disk, mode="raw", datastore=store)
            ended = lambda job_id: wait_for(lambda: Job.objects.filter(pk=job_id).exclude(  # noqa: E731
                state__in=Job.ACTIVE_STATES).first(), f"the end of job #{job_id}", 120, worker)
            assert ended(backup.pk).state == Job.State.SUCCEEDED
            copies = wait_for(lambda: (list(Job.objects.filter(kind="sync"))
                                       if Job.objects.filter(kind="sync").count() == 2 else None),
                              "two copy jobs", 30, worker)
            done = {job.destination.label: ended(job.pk) for job in copies}
            assert done["dav"].state == Job.State.SUCCEEDED, done["dav"].error
            assert done["dav"].progress["phase"] == "sync"
            assert done["dav"].progress["done"] == done["dav"].progress["total"] > 0
            assert done["dead"].state == Job.State.FAILED
            assert "rclone::webdav,url='http://127.0.0.1:9':store" in done["dead"].error
            image = Image.objects.get(disk=disk)
            assert list(image.copies.values_list("datastore__label", flat=True)) == ["dav"]
            wait_for(lambda: hook.received or None, "the copy's failure notification", 30)
            assert [message["title"] for message in hook.received] == [
                f"Copy job #{done['dead'].pk} to dead failed"]
            restored = tmp_path / "restored.img"
            drill = subprocess.run(
                [sys.executable, "-m", "imaging", "restore",
                 f"{remote}/images/{disk.stable_id}/{image.stamp}", str(restored)],
                cwd=REPO, capture_output=True, text=True, timeout=300)
            assert drill.returncode == 0, drill.stderr
            assert (hashlib.sha256(restored.read_bytes()).hexdigest()
                    == hashlib.sha256(disk_file.read_bytes()).hexdigest())
            assert served.exists()
    finally:
        hook.close()
    assert timezone.now() - image.copies.get().synced_at < dt.timedelta(minutes=5)
