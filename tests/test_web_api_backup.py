"""POST /api/disks/<id>/backup/ and /api/jobs/<id>/cancel/: queued on the right host, or refused."""
import datetime as dt

from django.test import override_settings
from django.utils import timezone
from support.web import MEMORY_LAYER, BaseTestCase, GiB, enqueued

from webui.models import Datastore, Disk, Host, Job, Schedule



@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class BackupApiTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)

    def backup(self, disk_id, body=None):
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            response = self.client.post(f"/api/disks/{disk_id}/backup/", body or {},
                                        content_type="application/json")
        return response, sent

    def assert_refused(self, response, sent, *words):
        self.assertEqual(response.status_code, 400, response.content)
        message = str(response.json())
        for word in words:
            self.assertIn(word, message)
        self.assertEqual(sent, [])

    def test_it_queues_a_backup_on_the_disks_host_as_its_schedule_says(self):
        response, sent = self.backup(self.d1.pk)
        self.assertEqual(response.status_code, 202, response.content)
        job = Job.objects.get(pk=response.json()["job"])
        self.assertEqual(response.json(), {"job": job.pk})
        self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.h1")])
        self.assertEqual((job.kind, job.state, job.host, job.disk, job.datastore),
                         ("backup", "queued", self.h1, self.d1, self.datastore))
        self.assertEqual(job.params, {"mode": "used", "level": 3, "force": False, "deltas": True})
        self.assertEqual(job.requested_by, self.alice)

    def test_the_job_is_followed_at_its_location(self):
        response, _ = self.backup(self.d1.pk)
        followed = self.client.get(response["Location"])
        self.assertEqual(followed.status_code, 200)
        self.assertEqual((followed.json()["id"], followed.json()["state"]),
                         (response.json()["job"], "queued"))

    def test_the_body_chooses_mode_level_and_datastore(self):
        nas = Datastore.objects.create(path="/mnt/nas/datastore")
        response, sent = self.backup(self.d2.pk, {"mode": "raw", "level": 19,
                                                  "datastore": nas.pk})
        self.assertEqual(response.status_code, 202, response.content)
        job = Job.objects.get(pk=response.json()["job"])
        self.assertEqual((job.disk, job.datastore), (self.d2, nas))
        self.assertEqual((job.params["mode"], job.params["level"]), ("raw", 19))

    def test_the_body_or_the_schedule_turns_deltas_off(self):
        response, _ = self.backup(self.d2.pk, {"deltas": False})
        self.assertEqual(response.status_code, 202, response.content)
        self.assertIs(Job.objects.get(pk=response.json()["job"]).params["deltas"], False)
        Job.objects.all().delete()
        Schedule.objects.filter(disk=self.d1).update(deltas=False)
        response, _ = self.backup(self.d1.pk)
        self.assertIs(Job.objects.get(pk=response.json()["job"]).params["deltas"], False)

    def test_a_disk_of_another_host_goes_to_that_hosts_queue(self):
        h2 = Host.objects.create(name="h2", last_seen=timezone.now())
        disk = Disk.objects.create(host=h2, stable_id="ata-h2-disk", size=GiB, path="/dev/sda")
        response, sent = self.backup(disk.pk)
        self.assertEqual(sent, [("webui.tasks.run_job", [response.json()["job"]], "host.h2")])
        self.assertEqual(Job.objects.get(pk=response.json()["job"]).host, h2)

    def test_a_host_that_is_offline_gets_the_job_and_the_api_says_it_waits(self):
        Host.objects.filter(pk=self.h1.pk).update(last_seen=timezone.now() - dt.timedelta(days=1))
        response, sent = self.backup(self.d1.pk)
        self.assertEqual(response.status_code, 202)
        shown = self.client.get(response["Location"]).json()
        self.assertEqual(shown["state"], "queued")
        self.assertIn("offline", shown["note"])

    def test_it_refuses_a_disk_busy_with_another_job(self):
        running = self.make_job(state=Job.State.RUNNING)
        response, sent = self.backup(self.d1.pk)
        self.assert_refused(response, sent, "busy", f"#{running.pk}")
        self.assertEqual(Job.objects.count(), 1)

    def test_it_refuses_a_disk_being_restored_onto(self):
        self.make_job("restore", disk=self.d2, target_disk=self.d1)
        self.assert_refused(*self.backup(self.d1.pk), "busy", "restore")

    def test_it_refuses_a_gone_disk(self):
        Disk.objects.filter(pk=self.d1.pk).update(present=False)
        self.assert_refused(*self.backup(self.d1.pk), "gone", self.d1.stable_id)
        self.assertFalse(Job.objects.exists())

    def test_it_refuses_bad_parameters_naming_the_field(self):
        cases = [({"mode": "fast"}, "mode"), ({"level": 0}, "level"), ({"level": 23}, "level"),
                 ({"level": "3x"}, "level"), ({"level": 3.5}, "level"),
                 ({"datastore": 9999}, "datastore"), ({"datastore": "/srv/x"}, "datastore"),
                 ({"force": True}, "force"), ({"mode": None}, "mode")]
        for body, field in cases:
            with self.subTest(body=body):
                response, sent = self.backup(self.d1.pk, body)
                self.assert_refused(response, sent, field)
        self.assertFalse(Job.objects.exists())

    def test_an_unknown_disk_is_not_found(self):
        response, sent = self.backup(self.d2.pk + 100)
        self.assertEqual(response.status_code, 404)
        self.assertEqual(sent, [])


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class CancelApiTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)

    def cancel(self, job):
        with self.captureOnCommitCallbacks(execute=True):
            return self.client.post(f"/api/jobs/{job.pk}/cancel/", {},
                                    content_type="application/json")

    def test_a_queued_job_is_cancelled_at_once(self):
        job = self.make_job()
        response = self.cancel(job)
        self.assertEqual((response.status_code, response.json()), (202, {"job": job.pk}))
        job.refresh_from_db()
        self.assertEqual(job.state, "cancelled")
        self.assertIsNotNone(job.finished)

    def test_a_running_job_is_asked_to_stop(self):
        job = self.make_job(state=Job.State.RUNNING)
        self.assertEqual(self.cancel(job).status_code, 202)
        job.refresh_from_db()
        self.assertEqual((job.state, job.cancel_requested), ("running", True))

    def test_a_finished_job_cannot_be_cancelled(self):
        job = self.make_job(state=Job.State.SUCCEEDED)
        response = self.cancel(job)
        self.assertEqual(response.status_code, 400)
        self.assertIn("nothing to cancel", response.json()["detail"])
        job.refresh_from_db()
        self.assertEqual(job.state, "succeeded")
