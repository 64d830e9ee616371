"""The pages, through Django's test client: who sees what, empty states, live hooks, 404s,
and a constant number of queries however long a disk's history is."""
from __future__ import annotations

import datetime as dt
import re
from unittest import mock

from django.db import connection
from django.template.loader import render_to_string
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from support.web import PLAIN_STATIC, BaseTestCase, GiB

from webui import pages
from webui.celery import app as celery_app
from webui.models import Datastore, Disk, Host, Image, Job, Schedule
from webui.services.delivery import RUN_JOB

MiB = 1024 ** 2


@override_settings(STORAGES=PLAIN_STATIC)
class PageTestCase(BaseTestCase):
    def setUp(self):
        # Jobs the pages start are queued in the database; no broker is reached.
        self.send_task = mock.patch.object(celery_app, "send_task").start()
        self.addCleanup(mock.patch.stopall)

    def page(self, path: str, user=None, status: int = 200) -> str:
        self.client.force_login(user or self.alice)
        response = self.client.get(path)
        self.assertEqual(response.status_code, status, path)
        return response.content.decode()

    @staticmethod
    def actions(html: str) -> list[str]:
        return re.findall(r'data-action="([^"]+)"', html)


class AccessTests(PageTestCase):
    def setUp(self):
        super().setUp()
        self.image = self.make_image(disk=self.d1)
        self.job = self.make_job(state=Job.State.RUNNING)

    def main_pages(self) -> dict[str, str]:
        return {"/": "dashboard", f"/disks/{self.d1.pk}/": "disk", f"/jobs/{self.job.pk}/": "job",
                "/schedules/": "schedules", "/datastores/": "datastores", "/hosts/": "hosts"}

    def test_every_page_renders_for_a_viewer_and_for_staff(self):
        for user in (self.bob, self.alice):
            for path, name in self.main_pages().items():
                html = self.page(path, user)
                self.assertIn(f'<body data-page="{name}"', html)
                self.assertIn(f"{user.username}<span class=\"role\">", html)

    def test_a_visit_without_login_goes_to_the_login_page_and_back(self):
        paths = [*self.main_pages(), "/schedules/new/", f"/schedules/{self.schedule.pk}/",
                 f"/images/{self.image.pk}/restore/"]
        for path in paths:
            response = self.client.get(path)
            self.assertEqual(response.status_code, 302, path)
            self.assertEqual(response["Location"], f"/accounts/login/?next={path}")

    def test_the_login_page_has_the_fields_and_logs_in(self):
        html = self.client.get("/accounts/login/?next=/hosts/").content.decode()
        self.assertIn('<body data-page="login"', html)
        for field in ('name="username"', 'name="password"', 'type="submit"'):
            self.assertIn(field, html)
        response = self.client.post("/accounts/login/", {
            "username": "bob", "password": "correct horse battery staple", "next": "/hosts/"})
        self.assertEqual((response.status_code, response["Location"]), (302, "/hosts/"))
        self.client.logout()
        wrong = self.client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
        self.assertContains(wrong, "Please enter a correct username and password", status_code=200)

    def test_logging_out_takes_a_post_and_ends_the_session(self):
        self.client.force_login(self.bob)
        response = self.client.post("/accounts/logout/")
        self.assertEqual((response.status_code, response["Location"]), (302, "/accounts/login/"))
        self.assertEqual(self.client.get("/").status_code, 302)

    def test_a_viewer_sees_no_button_that_starts_or_cancels_a_job(self):
        for path in self.main_pages():
            self.assertEqual(self.actions(self.page(path, self.bob)), [], path)

    def test_staff_see_the_job_buttons(self):
        disk = self.page(f"/disks/{self.d1.pk}/")
        self.assertEqual(set(self.actions(disk)),
                         {"backup", "restore", "verify", "boot-test", "export", "delete"})
        self.assertIn(f'data-url="/api/disks/{self.d1.pk}/backup/"', disk)
        self.assertIn(f'data-url="/api/images/{self.image.pk}/verify/"', disk)
        self.assertEqual(self.actions(self.page(f"/jobs/{self.job.pk}/")), ["cancel"])
        self.assertEqual(set(self.actions(self.page("/datastores/"))),
                         {"gc", "verify-datastore", "add-remote"})

    def test_staff_pages_and_actions_refuse_a_viewer(self):
        for path in ("/schedules/new/", f"/schedules/{self.schedule.pk}/",
                     f"/images/{self.image.pk}/restore/"):
            html = self.page(path, self.bob, status=403)
            self.assertIn("is for staff users", html)
        jobs = Job.objects.count()
        for path, data in ((f"/images/{self.image.pk}/export/", {"name": "x.zst", "level": 3}),
                           (f"/images/{self.image.pk}/delete/", {}),
                           (f"/datastores/{self.datastore.pk}/gc/", {}),
                           (f"/datastores/{self.datastore.pk}/verify/", {}),
                           (f"/schedules/{self.schedule.pk}/", {"delete": "1"})):
            self.assertEqual(self.client.post(path, data).status_code, 403, path)
        self.assertEqual(Job.objects.count(), jobs)
        self.assertTrue(Image.objects.filter(pk=self.image.pk).exists())
        self.assertTrue(Schedule.objects.filter(pk=self.schedule.pk).exists())

    def test_unknown_ids_are_404_pages_never_500(self):
        self.client.force_login(self.alice)
        for path in ("/disks/999999/", "/jobs/999999/", "/schedules/999999/",
                     "/images/999999/restore/", "/disks/99999999999999999999999999/",
                     "/jobs/abc/", "/disks/-1/"):
            response = self.client.get(path)
            self.assertEqual(response.status_code, 404, path)
            self.assertIn("Nothing here", response.content.decode())
        for path in ("/images/999999/export/", "/images/999999/delete/", "/datastores/999999/gc/"):
            self.assertEqual(self.client.post(path, {}).status_code, 404, path)

    def test_pages_refuse_methods_they_do_not_take(self):
        self.client.force_login(self.alice)
        self.assertEqual(self.client.post("/").status_code, 405)
        self.assertEqual(self.client.get(f"/images/{self.image.pk}/delete/").status_code, 405)
        self.assertEqual(self.client.delete(f"/schedules/{self.schedule.pk}/").status_code, 405)


class DashboardTests(PageTestCase):
    def row(self, html: str, disk: Disk) -> str:
        match = re.search(rf'<li class="disk-row[^"]*" data-disk-id="{disk.pk}" '
                          r'data-protection="(\w+)">(.*?)</li>\s*(?=<li class="disk-row|</ul>)',
                          html, re.S)
        self.assertIsNotNone(match, f"no row for disk {disk.pk}")
        return match.group(1), match.group(2)

    def test_without_disks_it_says_how_they_come(self):
        Disk.objects.all().delete()
        html = self.page("/", self.bob)
        self.assertIn("No disks yet", html)
        self.assertIn("No jobs running.", html)
        self.assertIn("No failures in the last 7 days.", html)

    def test_each_disk_shows_its_protection_and_the_age_of_its_last_backup(self):
        # Fresh at any hour the test runs: the daily run is an hour away, not behind.
        soon = timezone.now() + dt.timedelta(hours=1)
        Schedule.objects.filter(pk=self.schedule.pk).update(cron=f"{soon.minute} {soon.hour} * * *")
        self.make_image(disk=self.d1, created=timezone.now() - dt.timedelta(hours=3))
        html = self.page("/")
        protection, row = self.row(html, self.d1)
        self.assertEqual(protection, "fresh")
        self.assertIn("Protected", row)
        self.assertIn("tone-good", html)
        self.assertIn(">3 h ago</time>", row)
        protection, row = self.row(html, self.d2)
        self.assertEqual(protection, "unscheduled")
        self.assertIn("Never backed up", row)
        self.assertIn("No backup schedule", row)

    def test_a_disk_never_backed_up_or_overdue_is_red(self):
        html = self.page("/")
        protection, row = self.row(html, self.d1)
        self.assertEqual(protection, "overdue")  # scheduled daily since 2026-01-01, no backup since
        self.assertIn('class="pill bad">Overdue', row)
        self.assertIn("need", html)  # "2 of 2 disks need attention"
        self.assertIn("2 of 2 disks need attention", html)

    def test_read_errors_or_a_read_write_mount_make_a_fresh_disk_amber(self):
        self.make_image(disk=self.d1, bad_bytes=8192, mounted_rw=True,
                        status="complete-with-read-errors")
        protection, row = self.row(self.page("/"), self.d1)
        self.assertEqual(protection, "fresh")
        self.assertIn('class="pill warn">Protected', row)
        self.assertIn("8.0 KiB unreadable in the last backup", row)
        self.assertIn("taken while mounted read-write", row)

    def test_a_failed_last_backup_is_red(self):
        self.make_image(disk=self.d1)
        self.make_job(state=Job.State.FAILED, error="input/output error at 12 MiB")
        html = self.page("/")
        protection, row = self.row(html, self.d1)
        self.assertEqual(protection, "failed")
        self.assertIn("Last backup failed", row)
        self.assertIn("Recent failures", html)
        self.assertIn("input/output error at 12 MiB", html)

    def test_running_jobs_have_a_progress_bar_to_update_live(self):
        job = self.make_job(state=Job.State.RUNNING, progress={
            "phase": "backup", "unit": "bytes", "done": 3 * GiB, "total": 10 * GiB,
            "rate": 200 * MiB, "eta": 35.0})
        html = self.page("/")
        row = re.search(rf'<li class="job-row" data-job-id="{job.pk}".*?</li>', html, re.S).group(0)
        self.assertIn(f'<progress value="{3 * GiB}" max="{10 * GiB}"', row)
        self.assertIn("30 %", row)
        self.assertIn("200 MiB/s", row)
        self.assertIn("35 s left", row)
        self.assertIn("reading", row)

    def test_hosts_show_online_or_when_last_seen(self):
        Host.objects.create(name="pi", last_seen=timezone.now() - dt.timedelta(hours=5))
        Host.objects.create(name="new-box")
        html = self.page("/")
        self.assertRegex(html, r'h1</span>\s*<span class="meta">online · 2 disks')
        self.assertRegex(html, r'pi</span>\s*<span class="meta">last seen <time[^>]*>5 h ago')
        self.assertRegex(html, r'new-box</span>\s*<span class="meta">never seen')

    def test_datastores_show_usage_and_what_dedup_saved(self):
        Datastore.objects.filter(pk=self.datastore.pk).update(
            total_bytes=1000 * GiB, free_bytes=600 * GiB, chunk_bytes=50 * GiB,
            logical_bytes=200 * GiB, image_count=10, chunk_count=12800)
        html = self.page("/")
        self.assertIn("400 GiB</span> of <span", html)
        self.assertIn(f'title="{150 * GiB:,} bytes">150 GiB', html)  # saved: 200 - 50
        self.assertIn("(4.0× smaller)", html)

    def test_the_dashboard_takes_the_same_queries_for_two_disks_or_forty(self):
        self.client.force_login(self.alice)
        self.make_image(disk=self.d1)
        self.make_job(state=Job.State.RUNNING)
        self.make_job(kind="verify", state=Job.State.FAILED, disk=self.d2, error="bad")
        with CaptureQueriesContext(connection) as few:
            self.assertEqual(self.client.get("/").status_code, 200)
        for number in range(38):
            disk = Disk.objects.create(host=self.h1, stable_id=f"disk-{number}", size=GiB,
                                       path=f"/dev/sd{number}")
            Schedule.objects.create(disk=disk, datastore=self.datastore)
            for _ in range(3):
                self.make_image(disk=disk)
        with CaptureQueriesContext(connection) as many:
            html = self.client.get("/").content.decode()
        self.assertEqual(html.count('class="disk-row'), 40)
        self.assertEqual(len(many), len(few), [query["sql"] for query in many])


class DiskPageTests(PageTestCase):
    def test_without_images_it_says_so_and_offers_a_backup(self):
        html = self.page(f"/disks/{self.d2.pk}/")
        self.assertIn("No backups yet", html)
        self.assertEqual(self.actions(html).count("backup"), 2)  # the header's and the empty state's
        self.assertIn("The chart fills in with the first backup.", html)
        self.assertIn("No jobs yet for this disk.", html)
        viewer = self.page(f"/disks/{self.d2.pk}/", self.bob)
        self.assertIn("No backups yet", viewer)
        self.assertNotIn("Back up now", viewer)

    def test_the_history_shows_each_image_with_its_figures(self):
        created = dt.datetime(2026, 3, 12, 3, 0, 41, tzinfo=dt.timezone.utc)
        image = self.make_image(disk=self.d1, created=created, size=10 * GiB,
                                stored_bytes=2 * GiB, new_bytes=300 * MiB, seconds=754.2,
                                bad_bytes=4096, mode="used", verified_at=created
                                + dt.timedelta(hours=1), verify_ok=True)
        html = self.page(f"/disks/{self.d1.pk}/")
        row = re.search(rf'<tr data-image-id="{image.pk}">.*?</tr>', html, re.S).group(0)
        self.assertIn('title="2026-03-12 03:00:41 UTC">2026-03-12 03:00', row)
        self.assertIn(f'title="{10 * GiB:,} bytes">10.0 GiB', row)
        self.assertIn(">2.0 GiB<", row)
        self.assertIn(">300 MiB<", row)
        self.assertIn("5.0×", row)  # 10 GiB of disk in 2 GiB stored
        self.assertIn('title="754.200 s">12 min', row)
        self.assertIn("4.0 KiB</span> unreadable", row)
        self.assertIn('class="tag good">intact', row)
        self.assertIn('<figure class="chart" data-chart="history">', html)
        self.assertIn('id="history-points"', html)

    def test_the_running_job_of_the_disk_has_the_live_hooks(self):
        job = self.make_job(state=Job.State.RUNNING, progress={
            "phase": "backup", "unit": "bytes", "done": GiB, "total": 10 * GiB, "rate": 0})
        html = self.page(f"/disks/{self.d1.pk}/")
        self.assertIn(f'data-job-panel data-job-id="{job.pk}" data-state="running"', html)
        self.assertIn(f'<progress data-job-progress value="{GiB}" max="{10 * GiB}"', html)
        self.assertIn("data-job-state>running<", html)

    def test_a_failed_job_leaves_its_state_and_error(self):
        self.make_job(state=Job.State.FAILED, error="/dev/sdb: input/output error")
        html = self.page(f"/disks/{self.d1.pk}/", self.bob)
        self.assertIn("data-job-state>failed<", html)
        self.assertIn("data-job-error>/dev/sdb: input/output error</p>", html)

    def test_a_disk_without_a_model_is_named_after_its_file(self):
        loop = Disk.objects.create(host=self.h1, stable_id="loop-h1-system.img", kind="loop",
                                   path="/dev/loop7", size=GiB)
        vm = Disk.objects.create(host=self.h1, stable_id="file-h1-vm.img", kind="file",
                                 path="/srv/vms/vm.img", size=GiB)
        self.assertIn("<h1>system.img <span", self.page(f"/disks/{loop.pk}/"))
        self.assertIn("<h1>vm.img <span", self.page(f"/disks/{vm.pk}/"))

    def test_the_partitions_on_the_disk_now_are_listed(self):
        Disk.objects.filter(pk=self.d1.pk).update(partitions=[
            {"name": "sdb1", "start": MiB, "size": 512 * MiB, "fstype": "vfat", "label": "EFI"},
            {"name": "sdb2", "start": 513 * MiB, "size": 9 * GiB, "fstype": "ext4",
             "label": "root"}])
        html = self.page(f"/disks/{self.d1.pk}/")
        self.assertRegex(html, r"(?s)<code>sdb1</code>.*?512 MiB.*?<strong>vfat</strong>.*?EFI")
        self.assertRegex(html, r"(?s)<code>sdb2</code>.*?9.0 GiB.*?<strong>ext4</strong>.*?root")

    def test_long_histories_are_paginated(self):
        start = timezone.now() - dt.timedelta(days=60)
        for day in range(60):
            self.make_image(disk=self.d1, created=start + dt.timedelta(days=day))
        first = self.page(f"/disks/{self.d1.pk}/")
        self.assertEqual(first.count("<tr data-image-id="), pages.HISTORY_PAGE_SIZE)
        self.assertIn("Page 1 of 3", first)
        self.assertIn("60 images", first)
        last = self.page(f"/disks/{self.d1.pk}/?page=3")
        self.assertEqual(last.count("<tr data-image-id="), 10)
        self.assertIn(start.strftime("%Y-%m-%d %H:%M"), last)  # the oldest is on the last page
        self.assertIn("Page 3 of 3", self.page(f"/disks/{self.d1.pk}/?page=99"))
        self.assertIn("Page 1 of 3", self.page(f"/disks/{self.d1.pk}/?page=nonsense"))

    def test_a_thousand_images_take_the_queries_of_three(self):
        self.client.force_login(self.alice)
        for _ in range(3):
            self.make_image(disk=self.d1)
        self.make_job(state=Job.State.SUCCEEDED)
        with CaptureQueriesContext(connection) as few:
            self.assertEqual(self.client.get(f"/disks/{self.d1.pk}/").status_code, 200)
        start = timezone.now() - dt.timedelta(days=1000)
        Image.objects.bulk_create(Image(
            disk=self.d1, datastore=self.datastore, stamp=f"old-{number}",
            path=f"/srv/datastore/images/d1/old-{number}", size=10 * GiB,
            stored_bytes=GiB + number * MiB, new_bytes=MiB, created=start + dt.timedelta(days=number))
            for number in range(997))
        with CaptureQueriesContext(connection) as many:
            html = self.client.get(f"/disks/{self.d1.pk}/").content.decode()
        self.assertIn("1000 images", html)
        self.assertEqual(html.count("<tr data-image-id="), pages.HISTORY_PAGE_SIZE)
        self.assertEqual(len(many), len(few), [query["sql"] for query in many])
        # The chart spans the whole history in a screen's worth of points, the newest last.
        chart = pages.history_chart(self.d1)
        self.assertEqual(len(chart.points), pages.CHART_POINTS)
        newest = Image.objects.filter(disk=self.d1).latest("created")
        self.assertEqual(chart.points[-1][1], int(newest.created.timestamp() * 1000))
        self.assertEqual(chart.x_ticks[0][1], start.strftime("%d %b %Y"))


class JobPageTests(PageTestCase):
    def test_a_running_job_shows_bytes_rate_eta_and_phase(self):
        job = self.make_job(state=Job.State.RUNNING, progress={
            "phase": "backup", "unit": "bytes", "done": 5 * GiB, "total": 10 * GiB,
            "rate": 100 * MiB, "eta": 3725.0, "bad_bytes": 0, "stored_bytes": GiB,
            "new_bytes": 10 * MiB})
        html = self.page(f"/jobs/{job.pk}/")
        self.assertIn(f'<progress data-job-progress value="{5 * GiB}" max="{10 * GiB}"', html)
        self.assertIn("data-job-percent>50.0 %<", html)
        self.assertIn("data-job-rate>100 MiB/s<", html)
        self.assertIn("data-job-eta>1 h 02 min<", html)
        self.assertIn("data-job-phase>reading<", html)
        self.assertIn("data-connection", html)
        self.assertIn('data-chart="rate"', html)
        self.assertIn("data-badmap", html)
        self.assertIn(f'data-url="/api/jobs/{job.pk}/cancel/"', html)
        self.assertIn('id="job-data" type="application/json"', html)

    def test_a_stalled_job_says_since_when(self):
        moved = timezone.now() - dt.timedelta(hours=2)
        job = self.make_job(state=Job.State.RUNNING, progress_moved_at=moved)
        html = self.page(f"/jobs/{job.pk}/")
        self.assertRegex(html, r'<span class="stalled" data-job-stalled>stalled since <time')
        self.assertIn(f'datetime="{moved.isoformat()}"', html)
        fresh = self.make_job(state=Job.State.RUNNING, disk=self.d2, progress_moved_at=timezone.now())
        self.assertIn("data-job-stalled hidden", self.page(f"/jobs/{fresh.pk}/"))

    def test_a_finished_job_shows_its_error_its_log_and_no_cancel(self):
        job = self.make_job(state=Job.State.FAILED, error="target disk is gone",
                            requested_by=self.alice)
        html = self.page(f"/jobs/{job.pk}/")
        self.assertIn("data-job-state>failed<", html)
        self.assertIn("data-job-error>target disk is gone</p>", html)
        self.assertNotIn('data-action="cancel"', html)
        self.assertIn("Queued by alice for host h1", html)
        self.assertIn("Failed after", html)

    def test_the_read_error_strip_marks_the_image_bad_ranges(self):
        image = self.make_image(disk=self.d1, size=10 * GiB, bad_bytes=8192,
                                bad_ranges=[[GiB, 4096], [5 * GiB, 4096]])
        job = self.make_job(state=Job.State.SUCCEEDED_WITH_WARNINGS, image=image,
                            error="8192 unreadable bytes stored as zeros")
        html = self.page(f"/jobs/{job.pk}/", self.bob)
        self.assertEqual(re.findall(r'<rect class="bad" x="([\d.]+)"', html), ["100.0", "500.0"])
        self.assertIn("2 unreadable areas", html)
        self.assertIn('class="job-error warning" data-job-error>8192 unreadable', html)

    def test_a_queued_job_says_why_it_waits(self):
        job = self.make_job(note="host h1 is offline: the job waits in its queue until its "
                                 "worker is back")
        html = self.page(f"/jobs/{job.pk}/")
        self.assertIn("data-job-phase>waiting for a worker<", html)
        self.assertIn("host h1 is offline", html)
        self.assertIn("<progress data-job-progress  aria-label", html)  # indeterminate


class ActionTests(PageTestCase):
    def test_export_starts_a_job_on_this_host_and_shows_it(self):
        image = self.make_image(disk=self.d1)
        self.client.force_login(self.alice)
        with self.captureOnCommitCallbacks(execute=True):
            response = self.client.post(f"/images/{image.pk}/export/", {
                "name": "d1-march.img.zst", "level": "19", "long_distance": "on",
                "split_size": "2G"})
        job = Job.objects.get(kind="export")
        self.assertRedirects(response, f"/jobs/{job.pk}/", fetch_redirect_response=False)
        self.assertEqual(job.params, {"name": "d1-march.img.zst", "level": 19,
                                      "long_distance": True, "split_size": 2 * GiB,
                                      "format": "zstd"})
        self.assertEqual(job.requested_by, self.alice)
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue=job.host.queue)

    def test_an_export_as_a_vm_disk_needs_no_level_and_takes_no_parts(self):
        image = self.make_image(disk=self.d1)
        self.client.force_login(self.alice)
        # The dialog sends no zstd options for a VM disk.
        with self.captureOnCommitCallbacks(execute=True):
            self.client.post(f"/images/{image.pk}/export/", {"name": "d1.qcow2",
                                                             "format": "qcow2"})
        job = Job.objects.get(kind="export")
        self.assertEqual((job.params["format"], job.params["level"], job.params["split_size"]),
                         ("qcow2", 3, None))
        response = self.client.post(f"/images/{image.pk}/export/", {
            "name": "d1.vmdk", "format": "vmdk", "split_size": "2G"}, follow=True)
        self.assertContains(response, "Not exported: a vmdk export is one file of its own "
                                      "format: parts and long-distance matching are for the "
                                      "zstd stream")
        response = self.client.post(f"/images/{image.pk}/export/", {
            "name": "d1.img", "format": "raw"}, follow=True)
        self.assertContains(response, "Not exported: format: Select a valid choice.")
        self.assertEqual(Job.objects.count(), 1)

    def test_an_export_name_with_a_folder_is_refused_with_the_reason(self):
        image = self.make_image(disk=self.d1)
        self.client.force_login(self.alice)
        response = self.client.post(f"/images/{image.pk}/export/",
                                    {"name": "../etc/passwd", "level": "3"}, follow=True)
        self.assertContains(response, "Not exported: name: use letters, digits and ._+- only")
        self.assertFalse(Job.objects.exists())

    def test_gc_and_verify_start_from_the_datastores_page(self):
        self.client.force_login(self.alice)
        response = self.client.post(f"/datastores/{self.datastore.pk}/gc/")
        gc = Job.objects.get(kind="gc")
        self.assertRedirects(response, f"/jobs/{gc.pk}/", fetch_redirect_response=False)
        newest = self.make_image(disk=self.d1)
        self.make_image(disk=self.d1, created=timezone.now() - dt.timedelta(days=1))
        other = self.make_image(disk=self.d2)
        response = self.client.post(f"/datastores/{self.datastore.pk}/verify/", follow=True)
        verified = set(Job.objects.filter(kind="verify").values_list("image", flat=True))
        self.assertEqual(verified, {newest.pk, other.pk})
        self.assertContains(response, "Verifying the newest image of 2 disks")

    def test_the_datastores_page_shows_chunks_dedup_and_last_runs(self):
        Datastore.objects.filter(pk=self.datastore.pk).update(
            chunk_count=183245, chunk_bytes=GiB, logical_bytes=8 * GiB, image_count=4,
            last_gc=timezone.now() - dt.timedelta(days=3))
        html = self.page("/datastores/", self.bob)
        self.assertIn("183,245", html)
        self.assertIn("8.0×", html)
        self.assertRegex(html, r"Last garbage collection</dt><dd><time[^>]*>3 days ago")
        self.assertRegex(html, r"Last verify</dt><dd><span class=\"muted\">never")

    def test_the_hosts_page_lists_each_host_with_its_disks(self):
        Host.objects.create(name="empty-host")
        html = self.page("/hosts/", self.bob)
        self.assertRegex(html, r'h1</h2>\s*<span class="meta">online · worker <code>h1@test')
        self.assertEqual(html.count("<tr data-disk-id="), 2)
        self.assertIn("This host reports no disks.", html)


class ErrorPageTests(BaseTestCase):
    """With DEBUG off as in production, and no collected static files (a broken install)."""

    def test_404_and_403_say_what_to_do_even_without_collected_static_files(self):
        self.client.force_login(self.bob)
        missing = self.client.get("/disks/999999/")
        self.assertEqual(missing.status_code, 404)
        self.assertContains(missing, "The dashboard lists what there is.", status_code=404)
        self.assertContains(missing, 'href="/static/webui/app.css"', status_code=404)
        refused = self.client.get("/schedules/new/")
        self.assertContains(refused, "Ask an administrator to make your account staff",
                            status_code=403)

    def test_the_500_page_needs_no_context(self):
        html = render_to_string("500.html")
        self.assertIn("Something broke on the server", html)
        self.assertIn("data/logs/web.log", html)
