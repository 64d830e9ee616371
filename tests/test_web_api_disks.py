"""The read side of the API: its shapes, pagination, and a fixed number of queries."""
import datetime as dt

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from support.web import GiB, BaseTestCase

from webui.models import Datastore, Disk, Host, Job, Schedule

DISK_KEYS = {"id", "stable_id", "host", "model", "serial", "size", "path", "present",
             "last_backup", "overdue", "protection"}
IMAGE_KEYS = {"id", "disk", "stamp", "mode", "status", "size", "stored_bytes", "new_bytes",
              "bad_bytes", "sha256", "created", "seconds", "verified", "encrypted", "protected"}
JOB_KEYS = {"id", "kind", "state", "stalled", "host", "disk", "image", "target_disk", "progress",
            "error", "note", "result", "created", "started", "finished", "worker"}
PROGRESS_KEYS = {"phase", "unit", "done", "total", "rate", "eta", "bad_bytes", "stored_bytes",
                 "new_bytes", "sent_at"}
PAGE_KEYS = {"count", "next", "previous", "results"}


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


class ReadApiTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.bob)

    def get(self, path):
        response = self.client.get(path)
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()

    def add_disks(self, count, host=None):
        """`count` more disks, each with two images, a schedule and a finished backup."""
        host = host or self.h1
        for n in range(count):
            disk = Disk.objects.create(host=host, stable_id=f"{host.name}-extra-{n}",
                                       size=GiB, path=f"/dev/extra{n}")
            Schedule.objects.create(disk=disk, datastore=self.datastore, cron="0 2 * * *")
            self.make_image(disk, created=timezone.now() - dt.timedelta(days=1))
            self.make_image(disk)
            self.make_job(disk=disk, state=Job.State.SUCCEEDED)

    def queries_for(self, path):
        with CaptureQueriesContext(connection) as queries:
            self.get(path)
        return len(queries)


class DiskApiTestCase(ReadApiTestCase):
    def test_a_disk_has_exactly_the_design_fields(self):
        newest = timezone.now() - dt.timedelta(hours=2)
        self.make_image(self.d1, created=newest - dt.timedelta(days=1))
        self.make_image(self.d1, created=newest)
        disk = self.get(f"/api/disks/{self.d1.pk}/")
        self.assertEqual(set(disk), DISK_KEYS)
        self.assertEqual(disk, {
            "id": self.d1.pk, "stable_id": "wwn-0x5000c500a1b2c3d4", "host": "h1",
            "model": "Disk One", "serial": "S1", "size": 10 * GiB, "path": "/dev/sdb",
            "present": True, "last_backup": iso(newest),
            "overdue": self.d1.protection() == "overdue",
            "protection": self.d1.protection().value})

    def test_protection_is_the_models_rule(self):
        """d1: daily at 03:00 since 2026-01-01; d2: no schedule."""
        now = timezone.now()
        cases = {
            "never backed up": lambda: None,
            "backed up just now": lambda: self.make_image(self.d1, created=now),
            "backed up two days ago": lambda: self.make_image(
                self.d1, created=now - dt.timedelta(days=2)),
            "last backup failed": lambda: self.make_job(state=Job.State.FAILED),
            "schedule disabled": lambda: Schedule.objects.update(enabled=False),
        }
        seen = set()
        for case, arrange in cases.items():
            with self.subTest(case):
                arrange()
                for disk in (self.d1, self.d2):
                    shown = self.get(f"/api/disks/{disk.pk}/")
                    self.assertEqual(shown["protection"], disk.protection().value)
                    self.assertEqual(shown["overdue"], disk.protection() == "overdue")
                    seen.add(shown["protection"])
        self.assertEqual(seen, {"overdue", "fresh", "failed", "unscheduled"})

    def test_a_gone_disk_is_listed_with_its_history(self):
        self.make_image(self.d2)
        Disk.objects.filter(pk=self.d2.pk).update(present=False)
        listed = {disk["id"]: disk for disk in self.get("/api/disks/")["results"]}
        self.assertFalse(listed[self.d2.pk]["present"])
        self.assertIsNotNone(listed[self.d2.pk]["last_backup"])
        self.assertEqual(self.get(f"/api/images/?disk={self.d2.pk}")["count"], 1)

    def test_the_disk_list_is_paginated(self):
        self.add_disks(58)
        first = self.get("/api/disks/")
        self.assertEqual(set(first), PAGE_KEYS)
        self.assertEqual(first["count"], 60)
        self.assertEqual(len(first["results"]), 50)
        self.assertIsNone(first["previous"])
        self.assertTrue(first["next"].endswith("/api/disks/?page=2"), first["next"])
        second = self.get("/api/disks/?page=2")
        self.assertEqual(len(second["results"]), 10)
        self.assertIsNone(second["next"])
        ids = [disk["id"] for disk in first["results"] + second["results"]]
        self.assertEqual(sorted(ids), sorted(Disk.objects.values_list("pk", flat=True)))
        self.assertEqual(self.client.get("/api/disks/?page=3").status_code, 404)

    def test_the_disk_list_costs_the_same_queries_for_2_or_50_disks(self):
        few = self.queries_for("/api/disks/")
        self.add_disks(48)
        many = self.queries_for("/api/disks/")
        self.assertEqual(len(self.get("/api/disks/")["results"]), 50)
        self.assertEqual(many, few)
        # session, user, count, disks (host and facts joined in), their schedules
        self.assertLessEqual(many, 5)

    def test_a_disk_page_costs_as_few_queries(self):
        self.add_disks(3)
        self.assertLessEqual(self.queries_for(f"/api/disks/{self.d1.pk}/"), 4)


class ImageApiTestCase(ReadApiTestCase):
    def test_an_image_has_exactly_the_design_fields(self):
        created = timezone.now() - dt.timedelta(minutes=5)
        image = self.make_image(self.d1, created=created, stamp="2026-12-01T20-00-00Z",
                                bad_bytes=512, seconds=12.5, verify_ok=True,
                                verified_at=timezone.now())
        shown = self.get(f"/api/images/{image.pk}/")
        self.assertEqual(shown, {
            "id": image.pk, "disk": self.d1.pk, "stamp": "2026-12-01T20-00-00Z", "mode": "raw",
            "status": "complete", "size": 10 * GiB, "stored_bytes": 10 * GiB // 4,
            "new_bytes": 10 * GiB // 8, "bad_bytes": 512, "sha256": "ab" * 32,
            "created": iso(created), "seconds": 12.5, "verified": True,
            "encrypted": False, "protected": None})
        self.assertEqual(set(shown), IMAGE_KEYS)

    def test_it_lists_one_disks_history_newest_first(self):
        now = timezone.now()
        old = self.make_image(self.d1, created=now - dt.timedelta(days=2))
        new = self.make_image(self.d1, created=now)
        self.make_image(self.d2, created=now - dt.timedelta(days=1))
        history = self.get(f"/api/images/?disk={self.d1.pk}")
        self.assertEqual(history["count"], 2)
        self.assertEqual([image["id"] for image in history["results"]], [new.pk, old.pk])
        self.assertEqual([image["verified"] for image in history["results"]], [False, False])
        self.assertEqual(self.get("/api/images/")["count"], 3)

    def test_it_refuses_a_disk_filter_that_is_not_an_id(self):
        for value in ("abc", "1.5", "-1", "0", "/dev/sdb"):
            with self.subTest(value=value):
                response = self.client.get("/api/images/", {"disk": value})
                self.assertEqual(response.status_code, 400)
                self.assertIn("disk", response.json())

    def test_the_history_costs_the_same_queries_for_1_or_50_images(self):
        self.make_image(self.d1)
        few = self.queries_for(f"/api/images/?disk={self.d1.pk}")
        for n in range(60):
            self.make_image(self.d1, created=timezone.now() - dt.timedelta(hours=n + 1))
        many = self.queries_for(f"/api/images/?disk={self.d1.pk}")
        self.assertEqual(len(self.get(f"/api/images/?disk={self.d1.pk}")["results"]), 50)
        self.assertEqual(many, few)
        self.assertLessEqual(many, 4)  # session, user, count, the page


class JobApiTestCase(ReadApiTestCase):
    def test_a_job_has_exactly_the_design_fields_and_its_progress(self):
        progress = {"phase": "backup", "unit": "bytes", "done": 5 * GiB, "total": 10 * GiB,
                    "rate": 2.5e8, "eta": 20.0, "bad_bytes": 0, "stored_bytes": GiB,
                    "new_bytes": GiB // 2, "sent_at": 1796000000.5}
        job = self.make_job(state=Job.State.RUNNING, progress=progress, worker="h1@test")
        shown = self.get(f"/api/jobs/{job.pk}/")
        self.assertEqual(set(shown), JOB_KEYS)
        self.assertEqual(shown["progress"], progress)
        self.assertEqual((shown["kind"], shown["state"], shown["host"], shown["disk"]),
                         ("backup", "running", "h1", self.d1.pk))
        self.assertEqual((shown["image"], shown["target_disk"], shown["worker"]),
                         (None, None, "h1@test"))
        self.assertFalse(shown["stalled"])

    def test_a_queued_job_shows_empty_progress(self):
        shown = self.get(f"/api/jobs/{self.make_job().pk}/")
        self.assertEqual(set(shown["progress"]), PROGRESS_KEYS)
        self.assertEqual((shown["progress"]["done"], shown["progress"]["phase"]), (0, None))

    def test_a_job_whose_progress_stopped_moving_is_stalled(self):
        long_ago = timezone.now() - dt.timedelta(days=1)
        job = self.make_job(state=Job.State.RUNNING, started=long_ago, progress_moved_at=long_ago)
        shown = self.get(f"/api/jobs/{job.pk}/")
        self.assertTrue(shown["stalled"])
        self.assertEqual(shown["state"], "running")

    def test_jobs_filter_by_state_and_disk(self):
        restore = self.make_job("restore", disk=self.d2, target_disk=self.d1)
        done = self.make_job(state=Job.State.SUCCEEDED, disk=self.d2)
        queued = {job["id"] for job in self.get("/api/jobs/?state=queued")["results"]}
        self.assertEqual(queued, {restore.pk})
        of_d1 = {job["id"] for job in self.get(f"/api/jobs/?disk={self.d1.pk}")["results"]}
        self.assertEqual(of_d1, {restore.pk})
        of_d2 = {job["id"] for job in self.get(f"/api/jobs/?disk={self.d2.pk}")["results"]}
        self.assertEqual(of_d2, {restore.pk, done.pk})
        self.assertEqual(self.client.get("/api/jobs/?state=sleeping").status_code, 400)

    def test_the_job_list_costs_the_same_queries_for_1_or_50_jobs(self):
        self.make_job()
        few = self.queries_for("/api/jobs/")
        for _ in range(55):
            self.make_job(state=Job.State.SUCCEEDED)
        self.assertEqual(self.queries_for("/api/jobs/"), few)


class HostAndDatastoreApiTestCase(ReadApiTestCase):
    def test_a_host_says_whether_its_worker_reports(self):
        Host.objects.create(name="h2", last_seen=timezone.now() - dt.timedelta(hours=1))
        hosts = self.get("/api/hosts/")["results"]
        self.assertEqual([(host["name"], host["online"], host["queue"]) for host in hosts],
                         [("h1", True, "host.h1"), ("h2", False, "host.h2")])
        self.assertEqual(set(hosts[0]), {"id", "name", "queue", "worker", "last_seen", "online"})

    def test_a_datastore_shows_usage_chunks_and_dedup(self):
        Datastore.objects.filter(pk=self.datastore.pk).update(
            total_bytes=1000 * GiB, free_bytes=900 * GiB, chunk_count=1234, chunk_bytes=10 * GiB,
            image_count=30, logical_bytes=300 * GiB)
        shown = self.get(f"/api/datastores/{self.datastore.pk}/")
        self.assertEqual(
            {key: shown[key] for key in ("path", "used_bytes", "chunk_count", "dedup_ratio",
                                         "last_gc", "last_verify")},
            {"path": "/srv/datastore", "used_bytes": 100 * GiB, "chunk_count": 1234,
             "dedup_ratio": 30.0, "last_gc": None, "last_verify": None})


class ScheduleApiTestCase(ReadApiTestCase):
    def test_a_schedule_shows_its_rules_and_next_run(self):
        shown = self.get(f"/api/schedules/{self.schedule.pk}/")
        self.assertEqual((shown["disk"], shown["cron"], shown["mode"], shown["enabled"]),
                         (self.d1.pk, "0 3 * * *", "used", True))
        self.assertEqual(shown["grace"], "01:00:00")
        next_run = dt.datetime.fromisoformat(shown["next_run"])
        self.assertEqual((next_run.hour, next_run.minute), (3, 0))
        self.assertGreater(next_run, timezone.now())
        self.assertLessEqual(next_run - timezone.now(), dt.timedelta(days=1))
