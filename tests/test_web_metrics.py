"""/metrics: the catalog in Prometheus' text format, for staff and allowed addresses only.

Each family's samples are checked against rows made through the ORM; staff read it by
session or API token, a listed address with no credential; anyone else is refused with
a 4xx, whatever they send. A scrape costs the same queries for 2 disks as for 12.
"""
from __future__ import annotations

import datetime as dt

from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from support.web import GiB, BaseTestCase

from webui.api.authentication import new_token
from webui.models import BootTest, Datastore, Disk, Job, Protection, Schedule

ALLOWED = ["10.0.0.0/8", "2001:db8::1"]
# What Telegraf's Prometheus input asks for: no */*.
TELEGRAF_ACCEPT = ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
                   "encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3")


class MetricsTestCase(BaseTestCase):
    def setUp(self):
        super().setUp()
        self.client.force_login(self.alice)

    def scrape(self) -> dict[str, list]:
        """The samples of a staff user's scrape, by sample name."""
        response = self.client.get("/metrics")
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response["Content-Type"], CONTENT_TYPE_LATEST)
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(response.content.decode()):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    def value(self, samples: dict[str, list], name: str, **labels) -> float | None:
        """The value of the one sample of `name` with `labels`, None when there is none."""
        found = [sample.value for sample in samples.get(name, [])
                 if labels.items() <= sample.labels.items()]
        self.assertLessEqual(len(found), 1, f"{name}{labels}: {found}")
        return found[0] if found else None


class DiskMetricsTestCase(MetricsTestCase):
    """d1: daily at 03:00 since 2026-01-01, last backed up two days ago: overdue. d2: the
    same schedule, backed up just now. d3: no schedule, no image."""

    def setUp(self):
        super().setUp()
        self.now = timezone.now().replace(microsecond=0)
        self.d3 = Disk.objects.create(host=self.h1, stable_id="usb-spare", size=GiB,
                                      path="/dev/sdd", kind="disk")
        Schedule.objects.create(disk=self.d2, datastore=self.datastore, cron="0 3 * * *",
                                created=self.now - dt.timedelta(days=30))
        self.make_image(self.d2, created=self.now, stored_bytes=7, new_bytes=7)

    def labels_of(self, disk: Disk) -> dict[str, str]:
        return {"disk_id": str(disk.pk), "stable_id": disk.stable_id, "host": "h1",
                "title": disk.title}

    def test_backups_verifies_and_boot_tests_are_unix_seconds_of_their_newest(self):
        older, newer = self.now - dt.timedelta(days=3), self.now - dt.timedelta(days=2)
        intact_at, broken_at = self.now - dt.timedelta(hours=30), self.now - dt.timedelta(hours=5)
        proven = self.make_image(self.d1, created=older, verified_at=intact_at, verify_ok=True)
        stuck = self.make_image(self.d1, created=newer, verified_at=broken_at, verify_ok=False)
        # The older image booted, the newer did not: the older one's moment is the proof.
        for image, verdict in ((proven, "booted"), (stuck, "stuck"),
                               (self.d2.images.get(), "panic")):
            BootTest.objects.create(image=image, verdict=verdict, proven=verdict == "booted",
                                    seconds=8.0, accelerator="tcg", firmware="bios",
                                    finished=self.now)
        samples = self.scrape()
        d1, d2, d3 = (self.labels_of(disk) for disk in (self.d1, self.d2, self.d3))
        self.assertEqual(d1["title"], "Disk One")
        self.assertEqual(self.value(samples, "imaging_disk_last_backup_timestamp_seconds", **d1),
                         newer.timestamp())
        self.assertEqual(self.value(samples, "imaging_disk_last_verify_timestamp_seconds", **d1),
                         intact_at.timestamp())
        self.assertEqual(
            self.value(samples, "imaging_disk_last_proven_bootable_timestamp_seconds", **d1),
            older.timestamp())
        self.assertEqual(self.value(samples, "imaging_disk_last_backup_timestamp_seconds", **d2),
                         self.now.timestamp())
        for name in ("imaging_disk_last_verify_timestamp_seconds",
                     "imaging_disk_last_proven_bootable_timestamp_seconds"):
            self.assertIsNone(self.value(samples, name, **d2), name)
        for name in ("imaging_disk_last_backup_timestamp_seconds",
                     "imaging_disk_last_verify_timestamp_seconds",
                     "imaging_disk_last_proven_bootable_timestamp_seconds"):
            self.assertIsNone(self.value(samples, name, **d3), name)

    def test_overdue_is_the_models_rule(self):
        self.make_image(self.d1, created=self.now - dt.timedelta(days=2))
        self.assertEqual(self.d1.protection(), Protection.OVERDUE)
        self.assertEqual(self.d2.protection(), Protection.FRESH)
        samples = self.scrape()
        for disk, overdue in ((self.d1, 1), (self.d2, 0), (self.d3, 0)):
            with self.subTest(disk=disk.stable_id):
                self.assertEqual(
                    self.value(samples, "imaging_disk_overdue", **self.labels_of(disk)), overdue)
        self.make_image(self.d1)
        samples = self.scrape()
        self.assertEqual(self.value(samples, "imaging_disk_overdue", disk_id=str(self.d1.pk)), 0)

    def test_images_and_their_bytes_are_summed_per_disk(self):
        self.make_image(self.d1, stored_bytes=1000, new_bytes=600)
        self.make_image(self.d1, stored_bytes=1100, new_bytes=50)
        samples = self.scrape()
        expected = {self.d1: (2, 2100, 650), self.d2: (1, 7, 7), self.d3: (0, 0, 0)}
        for disk, (images, stored, new) in expected.items():
            with self.subTest(disk=disk.stable_id):
                labels = self.labels_of(disk)
                self.assertEqual(self.value(samples, "imaging_disk_images", **labels), images)
                self.assertEqual(self.value(samples, "imaging_disk_stored_bytes", **labels),
                                 stored)
                self.assertEqual(self.value(samples, "imaging_disk_new_bytes", **labels), new)


class DatastoreAndJobMetricsTestCase(MetricsTestCase):
    def test_a_datastore_as_its_scan_and_gc_left_it(self):
        collected = timezone.now().replace(microsecond=0) - dt.timedelta(days=1)
        Datastore.objects.filter(pk=self.datastore.pk).update(
            chunk_bytes=1000, chunk_count=10, logical_bytes=4000, last_gc=collected)
        remote = Datastore.objects.create(path="rclone:b2:bucket/images", label="b2",
                                          offsite=True)
        samples = self.scrape()
        home = {"datastore_id": str(self.datastore.pk), "datastore": "/srv/datastore"}
        self.assertEqual(self.value(samples, "imaging_datastore_size_bytes", **home), 1000)
        self.assertEqual(self.value(samples, "imaging_datastore_chunks", **home), 10)
        self.assertEqual(self.value(samples, "imaging_datastore_dedup_ratio", **home), 4.0)
        self.assertEqual(
            self.value(samples, "imaging_datastore_last_gc_timestamp_seconds", **home),
            collected.timestamp())
        self.assertIsNone(
            self.value(samples, "imaging_datastore_last_verify_timestamp_seconds", **home))
        b2 = {"datastore_id": str(remote.pk), "datastore": "b2"}
        self.assertEqual(self.value(samples, "imaging_datastore_size_bytes", **b2), 0)
        for name in ("imaging_datastore_dedup_ratio",
                     "imaging_datastore_last_gc_timestamp_seconds"):
            self.assertIsNone(self.value(samples, name, **b2), name)

    def test_jobs_by_kind_and_state_and_how_long_finished_ones_ran(self):
        start = timezone.now() - dt.timedelta(hours=1)
        for kind, state, seconds in [("backup", Job.State.SUCCEEDED, 60),
                                     ("backup", Job.State.SUCCEEDED, 30.5),
                                     ("backup", Job.State.FAILED, 10),
                                     ("verify", Job.State.SUCCEEDED, 5)]:
            self.make_job(kind, state, started=start,
                          finished=start + dt.timedelta(seconds=seconds))
        self.make_job("backup", Job.State.RUNNING)
        self.make_job("backup")
        self.make_job("backup", Job.State.CANCELLED, started=None)  # cancelled while queued
        samples = self.scrape()
        counts = {("backup", "succeeded"): 2, ("backup", "failed"): 1,
                  ("verify", "succeeded"): 1, ("backup", "running"): 1,
                  ("backup", "queued"): 1, ("backup", "cancelled"): 1}
        self.assertEqual({(sample.labels["kind"], sample.labels["state"]): sample.value
                          for sample in samples["imaging_jobs"]}, counts)
        ran = {("backup", "succeeded"): (2, 90.5), ("backup", "failed"): (1, 10),
               ("verify", "succeeded"): (1, 5)}
        self.assertEqual({(sample.labels["kind"], sample.labels["state"]): sample.value
                          for sample in samples["imaging_job_duration_seconds_count"]},
                         {labels: count for labels, (count, _) in ran.items()})
        for (kind, state), (_, seconds) in ran.items():
            self.assertAlmostEqual(self.value(samples, "imaging_job_duration_seconds_sum",
                                              kind=kind, state=state), seconds)


class MetricsQueriesTestCase(MetricsTestCase):
    def add_disks(self, count: int) -> None:
        """`count` more disks, each with a schedule, two images, a backup and a boot test."""
        for n in range(Disk.objects.count(), Disk.objects.count() + count):
            disk = Disk.objects.create(host=self.h1, stable_id=f"h1-extra-{n}", size=GiB,
                                       path=f"/dev/extra{n}")
            Schedule.objects.create(disk=disk, datastore=self.datastore, cron="0 2 * * *")
            self.make_image(disk, created=timezone.now() - dt.timedelta(days=1),
                            verified_at=timezone.now(), verify_ok=True)
            self.make_image(disk)
            self.make_job(disk=disk, state=Job.State.SUCCEEDED)
            BootTest.objects.create(image=disk.images.first(), verdict="booted", proven=True,
                                    seconds=8.0, accelerator="tcg", firmware="bios",
                                    finished=timezone.now())

    def queries_of_a_scrape(self) -> int:
        with CaptureQueriesContext(connection) as queries:
            samples = self.scrape()
        self.assertEqual(len(samples["imaging_disk_overdue"]), Disk.objects.count())
        return len(queries)

    def test_a_scrape_costs_the_same_queries_for_more_disks(self):
        self.add_disks(1)
        few = self.queries_of_a_scrape()
        self.add_disks(10)
        self.assertEqual(self.queries_of_a_scrape(), few)


class MetricsAccessTestCase(BaseTestCase):
    def test_staff_read_it_by_session_or_token_whatever_they_accept(self):
        token = new_token(self.alice)
        self.assertEqual(self.client.get("/metrics", HTTP_AUTHORIZATION=f"Token {token}")
                         .status_code, 200)
        self.client.force_login(self.alice)
        for accept in (TELEGRAF_ACCEPT, "text/plain", "application/json", "*/*"):
            with self.subTest(accept=accept):
                response = self.client.get("/metrics", HTTP_ACCEPT=accept)
                self.assertEqual(response.status_code, 200)
                self.assertEqual(response["Content-Type"], CONTENT_TYPE_LATEST)

    def test_anyone_else_is_refused(self):
        self.assertIn(self.client.get("/metrics").status_code, (401, 403))
        token = new_token(self.bob)
        self.assertEqual(self.client.get("/metrics", HTTP_AUTHORIZATION=f"Token {token}")
                         .status_code, 403)
        self.client.force_login(self.bob)
        self.assertEqual(self.client.get("/metrics").status_code, 403)

    def test_bad_credentials_and_methods_are_4xx(self):
        for authorization in ("Token \x00", "Token not-hex!", f"Token {'a' * 5000}", "Token",
                              "Token a b", "Bearer x", "Token \xff\xfe"):
            with self.subTest(authorization=authorization):
                response = self.client.get("/metrics", HTTP_AUTHORIZATION=authorization)
                self.assertIn(response.status_code, (401, 403))
        self.client.force_login(self.alice)
        for method in ("post", "put", "delete"):
            with self.subTest(method=method):
                self.assertEqual(getattr(self.client, method)("/metrics").status_code, 405)

    @override_settings(METRICS_ALLOWED_ADDRESSES=ALLOWED)
    def test_an_allowed_address_needs_no_credential(self):
        for address in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"):
            with self.subTest(address=address):
                self.assertEqual(self.client.get("/metrics", REMOTE_ADDR=address).status_code,
                                 200)
        for address in ("192.0.2.1", "2001:db8::2", "", "not an address", "10.1.2.3\x00"):
            with self.subTest(address=address):
                self.assertEqual(self.client.get("/metrics", REMOTE_ADDR=address).status_code,
                                 403)

    def test_no_address_is_allowed_by_default(self):
        self.assertIn(self.client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code,
                      (401, 403))
