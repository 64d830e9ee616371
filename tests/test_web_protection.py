"""Disk.protection(now=): fresh, due, overdue, failed and unscheduled, at each boundary."""
import datetime as dt

from support.web import UTC, BaseTestCase

from webui.models import Job, Protection, Schedule

SECOND = dt.timedelta(seconds=1)


def utc(*parts):
    return dt.datetime(*parts, tzinfo=UTC)


class ProtectionTests(BaseTestCase):
    def test_a_disk_never_backed_up_is_due_from_the_first_run_after_its_schedule_began(self):
        # Schedule created 2026-01-01 00:00, daily at 03:00 UTC, grace 1 h.
        first_run = utc(2026, 1, 1, 3)
        self.assertEqual(self.d1.due_at(), first_run)
        self.assertEqual(self.d1.protection(now=first_run - SECOND), Protection.FRESH)
        self.assertEqual(self.d1.protection(now=first_run), Protection.DUE)
        self.assertEqual(self.d1.protection(now=first_run + dt.timedelta(hours=1) - SECOND),
                         Protection.DUE)
        self.assertEqual(self.d1.protection(now=first_run + dt.timedelta(hours=1)),
                         Protection.OVERDUE)

    def test_the_next_run_after_the_last_image_is_what_is_due(self):
        self.make_image(created=utc(2026, 3, 10, 3, 5))
        due = utc(2026, 3, 11, 3)
        self.assertEqual(self.d1.due_at(), due)
        self.assertEqual(self.d1.going_bad_after(), due + dt.timedelta(hours=1))
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 2, 59, 59)), Protection.FRESH)
        self.assertEqual(self.d1.protection(now=due), Protection.DUE)
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 11, 4)), Protection.OVERDUE)

    def test_an_image_taken_exactly_at_a_run_answers_that_run(self):
        self.make_image(created=utc(2026, 3, 10, 3))
        self.assertEqual(self.d1.due_at(), utc(2026, 3, 11, 3))

    def test_the_grace_time_is_the_schedules_own(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(grace=dt.timedelta(minutes=10))
        first_run = utc(2026, 1, 1, 3)
        self.assertEqual(self.d1.protection(now=first_run + dt.timedelta(minutes=10) - SECOND),
                         Protection.DUE)
        self.assertEqual(self.d1.protection(now=first_run + dt.timedelta(minutes=10)),
                         Protection.OVERDUE)

    def test_a_failed_last_backup_wins_over_any_time(self):
        self.make_image(created=utc(2026, 3, 10, 3, 5))
        self.make_job(state=Job.State.FAILED, finished=utc(2026, 3, 10, 4), error="input/output error")
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 10, 5)), Protection.FAILED)
        self.assertFalse(Protection.FAILED.protected)

    def test_a_later_successful_backup_clears_the_failure(self):
        self.make_job(state=Job.State.FAILED, finished=utc(2026, 3, 10, 4))
        self.make_job(state=Job.State.SUCCEEDED, finished=utc(2026, 3, 10, 5))
        self.make_image(created=utc(2026, 3, 10, 4, 30))
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 10, 6)), Protection.FRESH)

    def test_a_running_or_restore_job_does_not_decide(self):
        self.make_job(state=Job.State.FAILED, finished=utc(2026, 3, 10, 4))
        self.make_job(state=Job.State.RUNNING)
        self.make_job(kind="restore", state=Job.State.SUCCEEDED, target_disk=self.d1,
                      finished=utc(2026, 3, 10, 5))
        self.assertEqual(self.d1.protection(now=utc(2026, 3, 10, 6)), Protection.FAILED)

    def test_a_disk_without_an_enabled_schedule_is_unscheduled_and_not_protected(self):
        self.assertEqual(self.d2.protection(now=utc(2030, 1, 1)), Protection.UNSCHEDULED)
        self.assertIsNone(self.d2.going_bad_after())
        Schedule.objects.filter(pk=self.schedule.pk).update(enabled=False)
        self.assertEqual(self.d1.protection(now=utc(2030, 1, 1)), Protection.UNSCHEDULED)
        self.assertFalse(Protection.UNSCHEDULED.protected)
        self.assertTrue(Protection.FRESH.protected and Protection.DUE.protected)

    def test_runs_are_computed_in_the_schedules_zone_across_daylight_saving_time(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(time_zone="Europe/Berlin")
        # 03:00 in Berlin is 02:00 UTC in winter; after the spring change (2026-03-29) 01:00 UTC.
        self.make_image(created=utc(2026, 3, 28, 2, 30))
        due = utc(2026, 3, 29, 1)
        self.assertEqual(self.d1.due_at(), due)
        self.assertEqual(self.d1.protection(now=due - SECOND), Protection.FRESH)
        self.assertEqual(self.d1.protection(now=due), Protection.DUE)
        self.assertEqual(self.d1.protection(now=due + dt.timedelta(hours=1)), Protection.OVERDUE)

    def test_the_autumn_change_moves_the_run_back_to_two_utc(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(time_zone="Europe/Berlin")
        self.make_image(created=utc(2026, 10, 24, 1, 30))  # 03:30 CEST
        self.assertEqual(self.d1.due_at(), utc(2026, 10, 25, 2))  # 03:00 CET
