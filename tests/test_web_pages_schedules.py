"""Schedules from the pages: create and edit per disk, cron in plain words with the next
runs, retention, notification URLs with a test message, on/off; saving syncs beat."""
from __future__ import annotations

import json
import re
from unittest import mock

import apprise
from django.test import override_settings
from django_celery_beat.models import PeriodicTask
from support.web import PLAIN_STATIC, BaseTestCase, Outbox

from webui.models import Disk, Schedule
from webui.pages import describe_cron



def form_data(**changes) -> dict:
    """What the schedule form posts, as a browser would send it."""
    data = {"kind": "backup", "cron": "30 2 * * *", "time_zone": "Europe/Berlin", "mode": "used",
            "level": "3", "keep_last": "7", "keep_hourly": "0", "keep_daily": "14", "keep_weekly": "8",
            "keep_monthly": "12", "keep_yearly": "0", "grace_minutes": "90", "notify_urls": "",
            "enabled": "on"}
    data.update(changes)
    return {name: value for name, value in data.items() if value is not None}


@override_settings(STORAGES=PLAIN_STATIC)
class ScheduleFormTests(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)

    def form(self, **changes) -> dict:
        return form_data(datastore=self.datastore.pk, **changes)

    def test_a_new_schedule_for_a_disk_starts_from_that_disk(self):
        html = self.client.get(f"/schedules/new/?disk={self.d2.pk}").content.decode()
        self.assertIn('<body data-page="schedule-form"', html)
        self.assertRegex(html, rf'<option value="{self.d2.pk}" selected>h1 · Disk Two')
        self.assertIn("Every day at 03:00", html)  # the preview of the default cron
        self.assertEqual(html.count("<li><time datetime="), 5)
        self.assertIn('data-cron="0 3 * * 0">Every Sunday at 03:00', html)
        for name in ("cron", "time_zone", "mode", "level", "keep_last", "keep_daily",
                     "notify_urls", "enabled", "datastore", "grace_minutes"):
            self.assertRegex(html, rf'<label for="id_{name}">')
        for nonsense in ("?disk=abc", "?disk=99999999999999999999999", "?disk=999"):
            self.assertEqual(self.client.get(f"/schedules/new/{nonsense}").status_code, 200)

    def test_saving_creates_the_schedule_and_its_beat_entry(self):
        response = self.client.post("/schedules/new/", self.form(disk=self.d2.pk), follow=True)
        self.assertContains(response, "Saved: every day at 02:30.")
        schedule = Schedule.objects.get(disk=self.d2)
        self.assertEqual((schedule.cron, schedule.time_zone, schedule.grace.total_seconds()),
                         ("30 2 * * *", "Europe/Berlin", 5400))
        task = PeriodicTask.objects.get(name=f"schedule {schedule.pk}")
        self.assertEqual((task.crontab.minute, task.crontab.hour, str(task.crontab.timezone)),
                         ("30", "2", "Europe/Berlin"))
        self.assertTrue(task.enabled)
        self.d2.refresh_from_db()
        self.assertIsNotNone(self.d2.alert_after)  # its protection is watched from now on

    def test_a_bad_cron_is_shown_beside_the_field_and_nothing_is_saved(self):
        response = self.client.post("/schedules/new/", self.form(disk=self.d2.pk, cron="every day"))
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "is not a five-field cron expression")
        self.assertFalse(Schedule.objects.filter(disk=self.d2).exists())
        response = self.client.post("/schedules/new/", self.form(disk=self.d2.pk, time_zone="Mars/Base"))
        self.assertContains(response, "unknown time zone")

    def test_the_model_rules_apply(self):
        response = self.client.post("/schedules/new/", self.form(disk=""))
        self.assertContains(response, "a backup schedule names its disk")
        response = self.client.post("/schedules/new/", self.form(
            disk=self.d2.pk, keep_last="0", keep_daily="0", keep_weekly="0", keep_monthly="0"))
        self.assertContains(response, "Keep at least one image")
        response = self.client.post("/schedules/new/", self.form(kind="gc", disk="", cron="0 5 * * 6"))
        self.assertEqual(response.status_code, 302)
        self.assertTrue(Schedule.objects.filter(kind="gc", disk=None).exists())

    def test_editing_turns_it_off_and_beat_follows(self):
        self.client.post(f"/schedules/{self.schedule.pk}/",
                         self.form(disk=self.d1.pk, enabled=None, cron="0 4 * * 1"))
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.cron, self.schedule.enabled), ("0 4 * * 1", False))
        self.assertFalse(PeriodicTask.objects.get(name=f"schedule {self.schedule.pk}").enabled)
        html = self.client.get("/schedules/").content.decode()
        self.assertIn("every Monday at 04:00", html)
        self.assertIn('<span class="tag">off</span>', html)

    def test_deleting_removes_it_and_its_beat_entry(self):
        self.client.post(f"/schedules/{self.schedule.pk}/", self.form(disk=self.d1.pk))
        self.assertTrue(PeriodicTask.objects.filter(name=f"schedule {self.schedule.pk}").exists())
        response = self.client.post(f"/schedules/{self.schedule.pk}/", {"delete": "1"}, follow=True)
        self.assertContains(response, "Deleted the schedule")
        self.assertFalse(Schedule.objects.filter(pk=self.schedule.pk).exists())
        self.assertFalse(PeriodicTask.objects.filter(name=f"schedule {self.schedule.pk}").exists())

    def test_send_test_notifies_the_urls_typed_without_saving(self):
        outbox = Outbox()
        with mock.patch.object(apprise, "Apprise", outbox):
            response = self.client.post(f"/schedules/{self.schedule.pk}/", self.form(
                disk=self.d1.pk, cron="0 9 * * *", send_test="1",
                notify_urls="ntfy://ntfy.sh/lab\njson://127.0.0.1:9/hook"))
        self.assertContains(response, "Sent a test notification to 2 URL(s).")
        self.assertEqual([(urls, title) for urls, title, _ in outbox.sent],
                         [(("ntfy://ntfy.sh/lab", "json://127.0.0.1:9/hook"),
                           "Test from Disk imaging")])
        self.assertContains(response, "ntfy://ntfy.sh/lab")  # the form keeps what was typed
        self.schedule.refresh_from_db()
        self.assertEqual(self.schedule.cron, "0 3 * * *")
        empty = self.client.post(f"/schedules/{self.schedule.pk}/", self.form(send_test="1"))
        self.assertContains(empty, "Enter at least one notification URL to test.")

    def test_the_preview_describes_the_cron_and_lists_the_next_five_runs(self):
        answer = json.loads(self.client.get(
            "/schedules/preview/", {"cron": "0 3 * * *", "time_zone": "UTC"}).content)
        self.assertEqual((answer["description"], answer["error"]), ("every day at 03:00", ""))
        self.assertEqual(len(answer["next_runs"]), 5)
        self.assertTrue(all(run["text"].endswith("03:00 UTC") for run in answer["next_runs"]))
        bad = json.loads(self.client.get("/schedules/preview/", {"cron": "61 * * * *"}).content)
        self.assertEqual(bad["next_runs"], [])
        self.assertIn("is not a five-field cron expression", bad["error"])

    def test_cron_in_plain_words(self):
        cases = {"0 3 * * *": "every day at 03:00", "30 2 * * 0": "every Sunday at 02:30",
                 "5 4 * * 7": "every Sunday at 04:05", "0 3 1 * *": "on day 1 of every month at 03:00",
                 "0 */6 * * *": "every 6 hours", "*/15 * * * *": "every 15 minutes"}
        for cron, words in cases.items():
            self.assertEqual(describe_cron(cron), words, cron)
        self.assertEqual(describe_cron("0 22 * * 1-5"), "at 22:00, monday through friday")

    def test_the_list_offers_a_schedule_for_each_unscheduled_disk(self):
        html = self.client.get("/schedules/").content.decode()
        self.assertIn("every day at 03:00", html)
        self.assertIn(f'href="/schedules/new/?disk={self.d2.pk}"', html)
        self.client.force_login(self.bob)
        viewer = self.client.get("/schedules/").content.decode()
        self.assertIn("Disk Two", viewer)
        self.assertNotIn("/schedules/new/", viewer)
        self.assertNotIn(f"/schedules/{self.schedule.pk}/", viewer)
        self.assertIsNone(re.search(r"data-action=", viewer))

    def test_without_schedules_the_list_says_so(self):
        Schedule.objects.all().delete()
        html = self.client.get("/schedules/").content.decode()
        self.assertIn("No schedules yet", html)
        self.assertEqual(html.count("Add a schedule"), Disk.objects.count())
