"""POST /api/images/<id>/restore/ and verify/: a target is an inventoried disk's id, confirmed."""

from django.test import override_settings
from django.utils import timezone
from support.web import MEMORY_LAYER, BaseTestCase, GiB, enqueued

from webui.models import Disk, Host, Job



@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class RestoreApiTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)
        self.image = self.make_image(self.d1)  # 10 GiB: fits d2 (20 GiB)

    def restore(self, body, image=None):
        image = image or self.image
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            response = self.client.post(f"/api/images/{image.pk}/restore/", body,
                                        content_type="application/json")
        return response, sent

    def onto_d2(self, **changes):
        return {"target_disk": self.d2.pk, "confirm": self.d2.stable_id, **changes}

    def assert_refused(self, body, *words, image=None):
        jobs_before = Job.objects.count()
        response, sent = self.restore(body, image)
        self.assertEqual(response.status_code, 400, response.content)
        message = str(response.json())
        for word in words:
            self.assertIn(word, message)
        self.assertEqual(sent, [])
        self.assertEqual(Job.objects.count(), jobs_before)
        return response.json()

    def test_it_refuses_a_path(self):
        for path in ("/dev/sdc", "/dev/disk/by-id/" + self.d2.stable_id, "/srv/disk.img"):
            with self.subTest(path=path):
                refused = self.assert_refused(self.onto_d2(target_disk=path), "never by a path")
                self.assertEqual(list(refused), ["target_disk"])

    def test_it_refuses_anything_but_a_whole_number(self):
        for value in (str(self.d2.pk), self.d2.stable_id, float(self.d2.pk), True, None,
                      [self.d2.pk], {"id": self.d2.pk}):
            with self.subTest(value=value):
                self.assert_refused(self.onto_d2(target_disk=value), "target_disk")

    def test_it_refuses_an_unknown_disk(self):
        refused = self.assert_refused(self.onto_d2(target_disk=self.d2.pk + 100),
                                      f"no target disk with id {self.d2.pk + 100}")
        self.assertEqual(list(refused), ["detail"])
        self.assert_refused(self.onto_d2(target_disk=10 ** 30), "no target disk")

    def test_it_refuses_a_gone_disk(self):
        Disk.objects.filter(pk=self.d2.pk).update(present=False)
        self.assert_refused(self.onto_d2(), "gone", self.d2.stable_id)

    def test_it_refuses_a_disk_smaller_than_the_image(self):
        big = self.make_image(self.d2)  # 20 GiB onto d1's 10 GiB
        self.assert_refused({"target_disk": self.d1.pk, "confirm": self.d1.stable_id},
                            "too small", self.d1.stable_id, image=big)

    def test_it_refuses_a_confirm_that_is_not_the_targets_id(self):
        for confirm in (self.d1.stable_id, "yes", self.d2.stable_id.upper(),
                        f" {self.d2.stable_id}", ""):
            with self.subTest(confirm=confirm):
                self.assert_refused(self.onto_d2(confirm=confirm), "confirm")
        self.assert_refused({"target_disk": self.d2.pk}, "confirm")

    def test_it_refuses_a_disk_busy_with_another_job(self):
        busy = self.make_job(disk=self.d2, state=Job.State.RUNNING)
        self.assert_refused(self.onto_d2(), "busy", f"#{busy.pk}")

    def test_it_refuses_unknown_fields(self):
        self.assert_refused(self.onto_d2(verify=False), "verify", "unknown field")
        self.assert_refused(self.onto_d2(allowed_targets=["/dev/sda"]), "allowed_targets")

    def test_it_queues_a_confirmed_restore_on_the_targets_host(self):
        response, sent = self.restore(self.onto_d2())
        self.assertEqual(response.status_code, 202, response.content)
        job = Job.objects.get(pk=response.json()["job"])
        self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.h1")])
        self.assertEqual((job.kind, job.state, job.image, job.target_disk, job.host),
                         ("restore", "queued", self.image, self.d2, self.h1))
        self.assertEqual(job.requested_by, self.alice)
        shown = self.client.get(response["Location"]).json()
        self.assertEqual((shown["image"], shown["target_disk"]), (self.image.pk, self.d2.pk))

    def test_a_disk_of_another_host_is_a_target_and_that_host_runs_it(self):
        h2 = Host.objects.create(name="h2", last_seen=timezone.now())
        target = Disk.objects.create(host=h2, stable_id="ata-h2-big", size=100 * GiB,
                                     path="/dev/sdz")
        response, sent = self.restore({"target_disk": target.pk, "confirm": "ata-h2-big"})
        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(sent, [("webui.tasks.run_job", [response.json()["job"]], "host.h2")])

    def test_a_second_restore_onto_a_target_already_queued_is_refused(self):
        first, _ = self.restore(self.onto_d2())
        self.assertEqual(first.status_code, 202)
        self.assert_refused(self.onto_d2(), "busy", f"#{first.json()['job']}")


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class VerifyApiTestCase(BaseTestCase):
    def test_it_queues_a_verify_of_the_image(self):
        self.client.force_login(self.alice)
        image = self.make_image(self.d1)
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            response = self.client.post(f"/api/images/{image.pk}/verify/", {},
                                        content_type="application/json")
        self.assertEqual(response.status_code, 202, response.content)
        job = Job.objects.get(pk=response.json()["job"])
        self.assertEqual((job.kind, job.image, job.datastore), ("verify", image, self.datastore))
        self.assertEqual(sent, [("webui.tasks.run_job", [job.pk], "host.h1")])

    def test_an_unknown_image_is_not_found(self):
        self.client.force_login(self.alice)
        response = self.client.post("/api/images/12345/verify/", {},
                                    content_type="application/json")
        self.assertEqual(response.status_code, 404)
