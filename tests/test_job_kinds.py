"""Job kinds: each kind is one entry (webui/services/kinds.py) that the API, the forms, the
pages, the notifications and the worker ask; the parameters they take have one definition,
the engine's (webui/parameters.py)."""
from __future__ import annotations

import json
import re
from unittest import mock

import apprise
from django.test import override_settings
from django.utils import timezone
from support.services import wait_for
from support.web import MEMORY_LAYER, PLAIN_STATIC, BaseTestCase, Outbox, enqueued

import imaging.datastore.codec
import imaging.datastore.manifest
import imaging.prune
import imaging.datastore.store
from webui import services
from webui.celery import app
from webui.models import Host, Job, Schedule
from webui.services.registry import KINDS


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class ParameterTests(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)

    def test_a_schedule_keeps_hourly_images_as_the_engine_can(self):
        response = self.client.patch(f"/api/schedules/{self.schedule.pk}/", {"keep_hourly": 24},
                                     content_type="application/json")
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["keep_hourly"], 24)
        schedule = Schedule.objects.get(pk=self.schedule.pk)
        self.assertEqual(schedule.keep_hourly, 24)
        form = self.client.get(f"/schedules/{schedule.pk}/").content.decode()
        self.assertRegex(form, r'<label for="id_keep_hourly">Hourly</label>')
        self.assertIn(" · 24h · ", self.client.get("/schedules/").content.decode())
        with enqueued():
            prune = services.start_prune(schedule)
        self.assertEqual(prune.params["retention"],
                         {"last": 7, "hourly": 24, "daily": 14, "weekly": 8, "monthly": 12,
                          "yearly": 0})
        self.assertEqual(imaging.prune.Retention(**prune.params["retention"]).hourly, 24)

    def test_levels_and_modes_are_the_engines_wherever_they_are_typed(self):
        low, high = imaging.datastore.codec.LEVELS[0], imaging.datastore.codec.LEVELS[-1]
        schema = self.client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
        components = schema["components"]["schemas"]
        for name in ("BackupRequest", "Schedule"):
            level = components[name]["properties"]["level"]
            self.assertEqual((level["minimum"], level["maximum"]), (low, high), name)
        self.assertEqual(components["ModeEnum"]["enum"], list(imaging.datastore.manifest.MODES))
        form = self.client.get("/schedules/new/").content.decode()
        self.assertIn(f"Compression level ({low}–{high})", form)
        self.assertRegex(form, rf'name="level" value="3" min="{low}" max="{high}"')
        with enqueued() as sent:
            refused = self.client.post(f"/api/disks/{self.d1.pk}/backup/", {"level": high + 1},
                                       content_type="application/json")
            with self.assertRaisesMessage(services.Refused, f"is not a zstd level ({low}-{high})"):
                services.start_backup(self.d1, level=high + 1)
            with self.captureOnCommitCallbacks(execute=True):
                taken = self.client.post(f"/api/disks/{self.d1.pk}/backup/", {"level": high},
                                         content_type="application/json")
        self.assertEqual(refused.status_code, 400, refused.content)
        self.assertEqual(taken.status_code, 202, taken.content)
        self.assertEqual(sent, [("webui.tasks.run_job", [taken.json()["job"]], "host.h1")])


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class WordsTests(BaseTestCase):
    def test_a_job_is_told_by_its_kind_in_pages_and_notifications(self):
        outbox = Outbox()
        mock.patch.object(apprise, "Apprise", outbox).start()
        self.addCleanup(mock.patch.stopall)
        job = self.make_job("gc", Job.State.RUNNING, datastore=self.datastore)
        with override_settings(NOTIFY_URLS=["json://localhost/"]), \
                self.captureOnCommitCallbacks(execute=True):
            services.fail_job(job, "the datastore is locked")
        self.assertEqual([title for _, title, _ in outbox.sent],
                         [f"Garbage collection job #{job.pk} {self.datastore.path} failed"])
        self.client.force_login(self.bob)
        page = self.client.get(f"/jobs/{job.pk}/").content.decode()
        self.assertIn(f"<h1>Garbage collection of {self.datastore.path}</h1>", page)

    def test_a_page_with_jobs_gives_its_script_the_phases_words(self):
        self.client.force_login(self.bob)
        job = self.make_job()
        for path in ("/", f"/disks/{self.d1.pk}/", f"/jobs/{job.pk}/"):
            page = self.client.get(path).content.decode()
            found = re.search(r'<script id="phase-words" type="application/json">(.*?)</script>',
                              page)
            self.assertIsNotNone(found, path)
            self.assertEqual(json.loads(found.group(1)),
                             {name: kind.doing for name, kind in KINDS.items()})
        self.assertEqual(json.loads(found.group(1))["gc"], "collecting garbage")


def test_a_message_sent_under_a_kinds_earlier_task_name_runs_its_job(host_name, celery_worker,
                                                                      live_environment):
    """Before one task ran every kind, each kind had its own: an upgraded worker finding such
    a message in its queue runs the job all the same."""
    worker = celery_worker(host_name)
    host = wait_for(lambda: Host.objects.filter(name=host_name).first(), "the worker's host",
                    30, worker)
    imaging.datastore.store.Datastore.open_or_create(live_environment["IMAGING_DATASTORE"])
    store = services.datastore_at(live_environment["IMAGING_DATASTORE"])
    job = Job.objects.create(kind="gc", host=host, datastore=store, created=timezone.now())
    app.send_task("webui.tasks.run_gc", args=[job.pk], queue=host.queue)
    job = wait_for(lambda: Job.objects.filter(pk=job.pk).exclude(
        state__in=Job.ACTIVE_STATES).first(), f"end of job #{job.pk}", 60, worker)
    assert (job.state, job.error, job.worker) == (Job.State.SUCCEEDED, "", worker.node_name)
    assert job.result["removed"] == 0
    store.refresh_from_db()
    assert store.last_gc == job.finished
    assert "Task webui.tasks.run_gc[" in worker.log()
