"""Beat runs the sweeps in its own process, so that they never wait on a worker they watch:
each when due, one run of a sweep at a time, a failing one never stopping beat or the others."""
import datetime as dt
import threading
import time

from django.test import TransactionTestCase
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from support.web import LabMixin

from webui import beat, services
from webui.celery import app
from webui.models import Job


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def wait_for_threads(sweeper: beat.Sweeper) -> None:
    for sweep in sweeper.due:
        if sweep.thread is not None:
            sweep.thread.join(10)


class SweeperTests(TransactionTestCase):
    def test_each_sweep_runs_when_due_and_the_wait_is_until_the_next_one(self):
        runs = []
        clock = Clock()
        sweeper = beat.Sweeper([beat.Sweep("fast", 15, lambda: runs.append("fast")),
                                beat.Sweep("slow", 60, lambda: runs.append("slow"))], clock)
        self.assertEqual(sweeper.tick(), 15)
        wait_for_threads(sweeper)
        self.assertEqual(sorted(runs), ["fast", "slow"])
        clock.now += 10
        self.assertEqual(sweeper.tick(), 5)
        clock.now += 5
        self.assertEqual(sweeper.tick(), 15)
        wait_for_threads(sweeper)
        self.assertEqual(sorted(runs), ["fast", "fast", "slow"])

    def test_a_sweep_still_running_is_not_started_twice_and_a_failing_one_stops_nothing(self):
        release, runs = threading.Event(), []
        clock = Clock()

        def fails():
            runs.append("fails")
            raise RuntimeError("the database went away")

        sweeper = beat.Sweeper([beat.Sweep("slow", 1, lambda: (runs.append("slow"), release.wait(10))),
                                beat.Sweep("fails", 1, fails)], clock)
        with self.assertLogs("webui.beat", "ERROR") as logged:
            sweeper.tick()
            clock.now += 5
            time.sleep(0.2)
            sweeper.tick()
            release.set()
            wait_for_threads(sweeper)
        self.assertEqual((runs.count("slow"), runs.count("fails")), (1, 2))
        self.assertIn("sweep 'fails' failed", logged.output[0])


class SchedulerTests(LabMixin, TransactionTestCase):
    def setUp(self):
        self.create_lab()

    def test_beat_itself_fails_a_job_whose_worker_stopped_beating(self):
        stale = timezone.now() - dt.timedelta(minutes=5)
        job = Job.objects.create(kind="backup", host=self.h1, disk=self.d1,
                                 state=Job.State.RUNNING, started=stale, heartbeat_at=stale)
        scheduler = beat.Scheduler(app=app)
        self.assertLessEqual(scheduler.tick(), 15)
        wait_for_threads(scheduler.sweeper)
        job.refresh_from_db()
        self.assertEqual((job.state, job.error), (Job.State.FAILED, services.WORKER_LOST))
        # Nothing is sent to a worker's queue for it any more.
        self.assertFalse(PeriodicTask.objects.filter(name__in=["check jobs", "check protection"])
                         .exists())
