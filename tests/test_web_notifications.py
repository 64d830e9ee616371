"""Notifications leave through Apprise for real: a webhook on loopback receives them."""
from __future__ import annotations

import datetime as dt

from django.test import override_settings
from support.web import UTC, BaseTestCase
from support.webhook import Webhook

from webui import services
from webui.models import Disk, Job, Schedule


class WebhookTests(BaseTestCase):
    def setUp(self):
        self.hook = Webhook()
        self.addCleanup(self.hook.close)

    def test_notify_posts_the_title_and_body_to_a_json_webhook(self):
        self.assertTrue(services.notify("Backup failed", "disk sdb: input/output error",
                                        [self.hook.url]))
        self.assertEqual([(m["title"], m["message"]) for m in self.hook.received],
                         [("Backup failed", "disk sdb: input/output error")])

    def test_an_unreachable_channel_is_reported_false_not_raised(self):
        self.assertFalse(services.notify("t", "b", ["json://127.0.0.1:9/nobody-listens"]))

    def test_an_overdue_disk_reaches_the_global_and_the_schedule_webhooks_once(self):
        other = Webhook()
        self.addCleanup(other.close)
        Schedule.objects.filter(pk=self.schedule.pk).update(notify_urls=other.url)
        overdue = dt.datetime(2026, 1, 1, 4, tzinfo=UTC)
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="fresh", alert_after=overdue)
        with override_settings(NOTIFY_URLS=[self.hook.url]):
            self.assertEqual(services.check_protection(now=overdue), 1)
            self.assertEqual(services.check_protection(now=overdue + dt.timedelta(minutes=5)), 0)
        for received in (self.hook.received, other.received):
            self.assertEqual([m["title"] for m in received], [f"Disk {self.d1} is overdue"])
            self.assertIn("2026-01-01 03:00 UTC did not come", received[0]["message"])

    def test_a_failed_job_is_told_once_it_is_committed(self):
        job = self.make_job(state=Job.State.RUNNING, worker="h1@test")
        with override_settings(NOTIFY_URLS=[self.hook.url]), \
                self.captureOnCommitCallbacks(execute=True):
            services.fail_job(job, "cannot read /dev/sdb at byte 0: input/output error")
        self.assertEqual([m["title"] for m in self.hook.received],
                         [f"Backup job #{job.pk} {self.d1} failed"])
        self.assertIn("input/output error", self.hook.received[0]["message"])
