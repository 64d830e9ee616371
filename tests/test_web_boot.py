"""Boot tests in the dashboard: started from the API and the disk page, run by a worker's
task with real qemu, their verdict and screen kept per image and shown; "proven to boot
within N days" in a backup schedule, flagged and told like an overdue disk."""
from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path
from unittest import mock

from django.test import TestCase, TransactionTestCase, override_settings
from django.utils import timezone
from engine import MiB
from support.disks import PartSpec, build_disk
from support.fuse import unmount_own_image_mounts
from support.web import PLAIN_STATIC, BaseTestCase, LabMixin, enqueued
from test_boot import PNG_MAGIC, requires_qemu_and_payload

import imaging.backup
from bench import bootable
from webui import services, tasks
from webui.forms import ScheduleForm
from webui.models import BootTest, Image, Job, Protection, Schedule, StatusChange

PICTURE = PNG_MAGIC + b"a picture"


@override_settings(STORAGES=PLAIN_STATIC)
class BootTestPagesTests(BaseTestCase):
    def test_staff_start_one_through_the_api_and_viewers_cannot(self):
        image = self.make_image()
        url = f"/api/images/{image.pk}/boot-test/"
        self.assertIn(self.client.post(url).status_code, (401, 403))
        self.client.force_login(self.bob)
        self.assertEqual(self.client.post(url).status_code, 403)
        self.client.force_login(self.alice)
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            answer = self.client.post(url, {}, content_type="application/json")
        self.assertEqual(answer.status_code, 202, answer.content)
        job = Job.objects.get(kind="boot")
        self.assertEqual((job.image, job.disk, job.datastore), (image, self.d1, self.datastore))
        self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.h1")])
        junk = self.client.post(url, {"timeout": 5}, content_type="application/json")
        self.assertEqual(junk.status_code, 400)

    def test_the_disk_page_shows_each_images_last_boot_test_and_its_screen(self):
        booted, stuck, untested = (self.make_image(created=timezone.now() - dt.timedelta(days=n))
                                   for n in (1, 2, 3))
        BootTest.objects.create(
            image=booted, verdict="booted", proven=True, seconds=8.2, accelerator="tcg",
            firmware="bios", detail="demo login:", screenshot=PICTURE, finished=timezone.now())
        BootTest.objects.create(image=stuck, verdict="stuck", seconds=30.0, accelerator="tcg",
                                firmware="bios", detail="nothing changed", finished=timezone.now())
        self.client.force_login(self.bob)
        html = self.client.get(f"/disks/{self.d1.pk}/").content.decode()
        self.assertIn(f'<img src="/images/{booted.pk}/boot-screen.png"', html)
        self.assertIn('<span class="tag good" title="demo login:">booted</span>', html)
        self.assertIn('<span class="tag bad" title="nothing changed">stuck</span>', html)
        self.assertEqual(html.count('<td data-label="Boot test" class="boot-test">'
                                    '<span class="muted">not yet</span>'), 1)
        shot = self.client.get(f"/images/{booted.pk}/boot-screen.png")
        self.assertEqual((shot.status_code, shot["Content-Type"], shot.content),
                         (200, "image/png", PICTURE))
        for image in (stuck, untested):
            self.assertEqual(self.client.get(f"/images/{image.pk}/boot-screen.png").status_code,
                             404)
        # A viewer sees the results but has no action that starts one.
        self.assertNotIn('data-action="boot-test"', html)
        self.client.logout()
        self.assertEqual(self.client.get(f"/images/{booted.pk}/boot-screen.png").status_code, 302)

    def test_a_running_boot_tests_screen_is_live_and_its_last_stays(self):
        image = self.make_image()
        job = Job.objects.create(kind="boot", host=self.h1, disk=self.d1, image=image,
                                 state=Job.State.RUNNING)
        self.client.force_login(self.bob)
        url = f"/jobs/{job.pk}/screen.png"
        self.assertEqual(self.client.get(url).status_code, 404)  # no screen yet
        services.live_screen.show(job, PICTURE)
        self.assertEqual(self.client.get(url).content, PICTURE)
        page = self.client.get(f"/jobs/{job.pk}/").content.decode()
        self.assertIn(f'<img data-job-screen src="{url}"', page)
        Job.objects.filter(pk=job.pk).update(state=Job.State.FAILED)
        services.registry.KINDS["boot"].ended(job, timezone.now())
        self.assertIsNone(services.live_screen.screen(job))
        BootTest.objects.create(image=image, job=job, verdict="panic", seconds=4.0,
                                accelerator="tcg", firmware="bios", screenshot=PICTURE + b"!",
                                finished=timezone.now())
        self.assertEqual(self.client.get(url).content, PICTURE + b"!")

    def test_its_verdict_decides_the_jobs_state_and_its_line(self):
        kind = services.registry.KINDS["boot"]
        checked = {"chunks": 12, "problems": [], "filesystems": [
            {"number": 1, "volume": None, "type": "ext4", "result": "clean", "detail": ""}]}
        result = {"verdict": "no bootloader", "detail": "the disk's boot code is all zeros",
                  "seconds": 0.4, "firmware": "bios", "accelerator": "tcg", "verify": checked}
        self.assertEqual(kind.judge(result),
                         (Job.State.FAILED, "no bootloader: the disk's boot code is all zeros"))
        self.assertEqual(kind.judge(dict(result, verdict="booted"))[0], Job.State.SUCCEEDED)
        self.assertEqual(kind.result_lines(result), [
            "No bootloader in 0.4 s (bios, tcg): the disk's boot code is all zeros",
            "Checked 12 chunks: all intact", "Partition 1 (ext4): clean"])
        damaged = dict(checked, problems=[{"digest": "ab" * 32, "reason": "corrupt"}],
                       filesystems=[{"number": 2, "volume": "vg0/root", "type": "xfs",
                                     "result": "dirty", "detail": "bad inode"}])
        self.assertEqual(kind.judge(dict(result, verdict="booted", verify=damaged)), (
            Job.State.FAILED,
            "1 damaged chunk(s); filesystem check failed on volume vg0/root"))


class ProvenToBootTests(TestCase, LabMixin):
    @classmethod
    def setUpTestData(cls):
        cls.create_lab()

    def test_a_disk_not_proven_within_its_schedules_days_turns_unproven_and_is_told(self):
        now = timezone.now()
        Schedule.objects.filter(pk=self.schedule.pk).update(
            boot_within=dt.timedelta(days=7), cron="0 * * * *",
            created=now - dt.timedelta(days=30))
        image = self.make_image(created=now)  # the next hourly run is still ahead
        self.assertEqual(self.d1.protection(now), Protection.UNPROVEN)
        old = self.make_image(created=now - dt.timedelta(days=8))
        BootTest.objects.create(image=old, verdict="booted", proven=True, seconds=8,
                                accelerator="tcg", firmware="bios", finished=now)
        self.assertEqual(self.d1.protection(now), Protection.UNPROVEN)  # booted, but too old
        BootTest.objects.create(image=image, verdict="booted", proven=True, seconds=8,
                                accelerator="tcg", firmware="bios", finished=now)
        self.assertEqual(self.d1.protection(now), Protection.FRESH)
        self.assertEqual(self.d1.going_bad_after(),
                         min(self.d1.due_at() + self.schedule.grace,
                             image.created + dt.timedelta(days=7)))
        BootTest.objects.filter(image=image).update(verdict="panic", proven=False)
        self.d1.alert_after = now
        self.d1.save()
        with mock.patch("webui.services.protection.notify") as notify:
            self.assertEqual(services.check_protection(now), 1)
        title, body = notify.call_args.args[:2]
        self.assertEqual(title, f"Disk {self.d1} is not proven to boot")
        self.assertIn("an image proven to boot within 7 days 0 h; the newest image that booted is "
                      f"from {old.created:%Y-%m-%d %H:%M} UTC", body)
        self.assertEqual(StatusChange.objects.get().new, Protection.UNPROVEN)

    def test_only_a_backup_schedule_has_the_rule(self):
        form_data = {"kind": "verify", "datastore": self.datastore.pk, "cron": "0 4 * * *",
                     "time_zone": "UTC", "grace_minutes": 60, "boot_days": 7,
                     "mode": "used", "level": 3, "keep_last": 1, "keep_hourly": 0,
                     "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0,
                     "enabled": "on"}
        form = ScheduleForm(form_data)
        self.assertTrue(form.is_valid(), form.errors)
        self.assertIsNone(form.instance.boot_within)
        form = ScheduleForm(dict(form_data, kind="backup", disk=self.d2.pk))
        self.assertTrue(form.is_valid(), form.errors)
        self.assertEqual(form.instance.boot_within, dt.timedelta(days=7))


@override_settings(STORAGES=PLAIN_STATIC)
class BootTestRunTests(LabMixin, TransactionTestCase):
    """A boot test run by the worker's task, with real qemu: committed rows, as the job's
    heartbeat and cancel watcher read them from their own thread."""

    def setUp(self):
        requires_qemu_and_payload()
        self.create_lab()
        self.folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        disk = build_disk(self.folder / "bios.img", 48 * MiB, "dos",
                          [PartSpec(40 * MiB, "ext4")], seed=41, tail_noise=False).path
        bootable.make_bios_bootable(disk, 1)
        store = self.folder / "store"
        imaging.backup.backup(str(disk), store, disk_id="lab", mode="used")
        services.rescan(store)
        self.image = Image.objects.get()

    def tearDown(self):
        self.assertEqual(unmount_own_image_mounts(self.folder), [])

    def test_a_boot_test_job_proves_the_image_and_keeps_its_screen(self):
        with enqueued(), override_settings(HOST_NAME="h1"), \
                mock.patch.dict(os.environ, HOST_NAME="h1",
                                XDG_CACHE_HOME=str(self.folder / "cache")):
            job = services.start_boot_test(self.image, self.alice)
            tasks.run_job.apply(args=[job.pk])
        job.refresh_from_db()
        self.assertEqual(job.state, Job.State.SUCCEEDED, job.error)
        self.assertEqual(job.result["verdict"], "booted")
        self.assertEqual(job.result["console"][-1].strip(), bootable.LOGIN_PROMPT)
        # The drill checked every chunk and filesystem first, and the catalog kept it.
        self.assertEqual([(check["number"], check["type"], check["result"])
                          for check in job.result["verify"]["filesystems"]],
                         [(1, "ext4", "clean")])
        self.image.refresh_from_db()
        self.assertEqual((self.image.verify_ok, self.image.filesystems[0]["result"]),
                         (True, "clean"))
        test = BootTest.objects.get(image=self.image)
        self.assertEqual((test.verdict, test.proven, test.job, test.detail),
                         ("booted", True, job, bootable.LOGIN_PROMPT))
        self.assertTrue(bytes(test.screenshot).startswith(PNG_MAGIC))
        self.client.force_login(self.bob)
        page = self.client.get(f"/disks/{self.image.disk_id}/").content.decode()
        self.assertRegex(page, r'<span class="tag good" title="partition 1 \(ext4\): clean: '
                               r'[^"]*">fsck clean</span>')
        shot = self.client.get(f"/images/{self.image.pk}/boot-screen.png")
        self.assertEqual(shot.content, bytes(test.screenshot))
        self.assertEqual(self.client.get(f"/jobs/{job.pk}/screen.png").content,
                         bytes(test.screenshot))
