"""Schedules live in django-celery-beat: created, edited (beat notices), disabled, deleted, run once."""
import datetime as dt
import json
import time
from unittest import mock

from django.test import TransactionTestCase
from django.utils import timezone
from django_celery_beat.models import PeriodicTask, PeriodicTasks
from django_celery_beat.schedulers import DatabaseScheduler
from support.web import UTC, BaseTestCase, LabMixin

from webui import services
from webui.celery import app
from webui.models import Datastore, Disk, Job, Protection, Schedule
from webui.services.delivery import RUN_JOB


class SyncScheduleTests(BaseTestCase):
    def test_a_schedule_becomes_a_crontab_periodic_task_that_runs_it(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(time_zone="Europe/Berlin",
                                                            grace=dt.timedelta(minutes=30))
        self.schedule.refresh_from_db()
        services.sync_schedule(self.schedule)
        task = PeriodicTask.objects.get(name=f"schedule {self.schedule.pk}")
        self.assertEqual((task.task, json.loads(task.args), task.enabled, task.expire_seconds),
                         ("webui.tasks.run_schedule", [self.schedule.pk], True, 1800))
        crontab = task.crontab
        self.assertEqual((crontab.minute, crontab.hour, crontab.day_of_month,
                          crontab.month_of_year, crontab.day_of_week, str(crontab.timezone)),
                         ("0", "3", "*", "*", "*", "Europe/Berlin"))
        self.schedule.refresh_from_db()
        self.assertEqual(self.schedule.periodic_task, task)

    def test_an_edit_updates_the_same_task_and_moves_the_change_marker(self):
        services.sync_schedule(self.schedule)
        task = PeriodicTask.objects.get()
        marker = PeriodicTasks.last_change()
        time.sleep(0.01)
        self.schedule.cron = "15 4 * * 1-5"
        self.schedule.save()
        services.sync_schedule(self.schedule)
        edited = PeriodicTask.objects.get()
        self.assertEqual(edited.pk, task.pk)
        self.assertEqual((edited.crontab.minute, edited.crontab.hour, edited.crontab.day_of_week),
                         ("15", "4", "1-5"))
        self.assertGreater(PeriodicTasks.last_change(), marker)

    def test_a_disabled_schedule_disables_its_task(self):
        services.sync_schedule(self.schedule)
        self.schedule.enabled = False
        self.schedule.save()
        services.sync_schedule(self.schedule)
        self.assertFalse(PeriodicTask.objects.get().enabled)
        self.assertEqual(services.run_schedule(self.schedule.pk), [])

    def test_a_deleted_schedule_leaves_no_task(self):
        services.sync_schedule(self.schedule)
        self.assertEqual(PeriodicTask.objects.filter(name__startswith="schedule ").count(), 1)
        Disk.objects.filter(pk=self.d1.pk).update(protection_state="fresh")  # as swept
        self.schedule.delete()
        self.assertFalse(PeriodicTask.objects.filter(name__startswith="schedule ").exists())
        self.d1.refresh_from_db()
        self.assertEqual(self.d1.protection(), Protection.UNSCHEDULED)
        self.assertLessEqual(self.d1.alert_after, timezone.now())  # the sweeper records it

    def test_a_deleted_disk_takes_its_schedule_and_task_along(self):
        services.sync_schedule(self.schedule)
        self.d1.delete()
        self.assertFalse(PeriodicTask.objects.filter(name__startswith="schedule ").exists())

    def test_sync_schedules_syncs_every_schedule(self):
        Schedule.objects.create(kind=Schedule.Kind.GC, datastore=self.datastore, cron="0 5 * * 0")
        self.assertEqual(services.sync_schedules(), 2)
        self.assertEqual(PeriodicTask.objects.filter(name__startswith="schedule ").count(), 2)

class BeatTests(LabMixin, TransactionTestCase):
    """Against django-celery-beat's own DatabaseScheduler, which manages its connections
    (hence committed rows, not a test transaction)."""

    def setUp(self):
        self.create_lab()

    def test_a_running_beat_picks_the_edit_up_without_a_restart(self):
        self.schedule.cron = "*/5 * * * *"
        services.sync_schedule(self.schedule)
        beat = DatabaseScheduler(app=app)
        name = f"schedule {self.schedule.pk}"
        self.assertEqual(beat.schedule[name].schedule._orig_minute, "*/5")
        self.assertFalse(beat.schedule_changed())
        time.sleep(0.01)
        self.schedule.cron = "*/7 * * * *"
        services.sync_schedule(self.schedule)
        self.assertEqual(beat.schedule[name].schedule._orig_minute, "*/7")


class RunScheduleTests(BaseTestCase):
    def setUp(self):
        self.send_task = mock.patch.object(app, "send_task").start()
        self.addCleanup(mock.patch.stopall)

    def test_a_firing_starts_one_backup_however_often_it_is_delivered(self):
        fired = dt.datetime(2026, 12, 1, 3, 0, 2, tzinfo=UTC)
        with self.captureOnCommitCallbacks(execute=True):
            [job] = services.run_schedule(self.schedule.pk, now=fired)
            self.assertEqual(services.run_schedule(self.schedule.pk, now=fired), [])
        self.assertEqual((job.kind, job.disk, job.schedule, job.params["mode"]),
                         ("backup", self.d1, self.schedule, "used"))
        self.send_task.assert_called_once_with(RUN_JOB, args=[job.pk], queue="host.h1")

    def test_the_next_firing_runs_again(self):
        Job.objects.create(kind="backup", host=self.h1, disk=self.d1, schedule=self.schedule,
                           state=Job.State.SUCCEEDED,
                           created=dt.datetime(2026, 11, 30, 3, 0, 1, tzinfo=UTC))
        jobs = services.run_schedule(self.schedule.pk, now=dt.datetime(2026, 12, 1, 3, 0, 1, tzinfo=UTC))
        self.assertEqual(len(jobs), 1)

    def test_a_firing_for_a_busy_disk_starts_nothing(self):
        self.make_job(state=Job.State.RUNNING)
        self.assertEqual(services.run_schedule(self.schedule.pk), [])

    def test_a_verify_schedule_verifies_the_newest_image_of_each_disk(self):
        self.make_image(disk=self.d1, created=dt.datetime(2026, 11, 1, tzinfo=UTC))
        newest_d1 = self.make_image(disk=self.d1, created=dt.datetime(2026, 11, 2, tzinfo=UTC))
        newest_d2 = self.make_image(disk=self.d2, created=dt.datetime(2026, 11, 1, tzinfo=UTC))
        verify = Schedule.objects.create(kind=Schedule.Kind.VERIFY, datastore=self.datastore,
                                         cron="0 6 * * 0")
        jobs = services.run_schedule(verify.pk)
        self.assertEqual({job.image for job in jobs}, {newest_d1, newest_d2})
        self.assertTrue(all(job.kind == "verify" for job in jobs))

    def test_a_gc_schedule_collects_its_datastore(self):
        store = Datastore.objects.create(path="/srv/other")
        gc = Schedule.objects.create(kind=Schedule.Kind.GC, datastore=store, cron="0 5 * * 0")
        [job] = services.run_schedule(gc.pk)
        self.assertEqual((job.kind, job.datastore, job.schedule), ("gc", store, gc))
