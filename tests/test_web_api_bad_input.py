"""Whatever a client sends, the API answers 4xx with a JSON reason, never 5xx."""
import json

from django.conf import settings
from django.test import override_settings
from support.web import MEMORY_LAYER, BaseTestCase

from webui.models import Job, Schedule

MiB = 1024 * 1024


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER)
class BadInputTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)
        self.image = self.make_image(self.d1)

    def post_raw(self, path, body: bytes, content_type="application/json", method="post"):
        return getattr(self.client, method)(path, body, content_type=content_type)

    def writable_paths(self):
        return [f"/api/disks/{self.d2.pk}/backup/", f"/api/images/{self.image.pk}/restore/",
                f"/api/images/{self.image.pk}/verify/", "/api/schedules/"]

    def assert_client_error(self, response, status=400):
        self.assertEqual(response.status_code, status, response.content[:300])
        self.assertEqual(response["Content-Type"], "application/json")
        self.assertTrue(response.json())
        return response.json()

    def assert_nothing_started(self):
        self.assertFalse(Job.objects.exists())
        self.assertEqual(Schedule.objects.count(), 1)

    def test_junk_json_is_a_parse_error(self):
        for body in (b"{not json", b'{"mode": "raw"', b"\xff\xfe\x00garbage", b"[1, 2,]", b"NaN"):
            for path in self.writable_paths():
                with self.subTest(body=body, path=path):
                    self.assert_client_error(self.post_raw(path, body))
        self.assert_nothing_started()

    def test_a_body_that_is_not_an_object_is_refused(self):
        for body in ([], [{"mode": "raw"}], "raw", 3, None, True):
            for path in self.writable_paths():
                with self.subTest(body=body, path=path):
                    self.assert_client_error(self.post_raw(path, json.dumps(body)))
        self.assert_nothing_started()

    def test_forms_are_not_json(self):
        response = self.client.post(f"/api/disks/{self.d2.pk}/backup/", {"mode": "raw"})
        self.assert_client_error(response, 415)
        self.assert_nothing_started()

    def test_a_body_over_the_upload_limit_is_refused_before_it_is_read(self):
        self.assertLess(settings.DATA_UPLOAD_MAX_MEMORY_SIZE, 2 * MiB)
        huge = json.dumps({"cron": "0 3 * * *", "notify_urls": "x" * (2 * MiB)}).encode()
        for path in [*self.writable_paths(), "/api/auth/token/", "/api/disks/"]:
            with self.subTest(path=path):
                refused = self.assert_client_error(self.post_raw(path, huge), 413)
                self.assertIn("limit", refused["detail"])
        refused = self.assert_client_error(
            self.post_raw(f"/api/schedules/{self.schedule.pk}/", huge, method="patch"), 413)
        self.assert_nothing_started()
        self.assertEqual(Schedule.objects.get(pk=self.schedule.pk).notify_urls, "")

    def test_unknown_fields_are_refused_not_ignored(self):
        cases = [(f"/api/disks/{self.d2.pk}/backup/", {"mode": "raw", "forse": True}),
                 (f"/api/images/{self.image.pk}/restore/",
                  {"target_disk": self.d2.pk, "confirm": self.d2.stable_id, "no_verify": True}),
                 (f"/api/images/{self.image.pk}/verify/", {"repair": True}),
                 ("/api/schedules/", {"disk": self.d2.pk, "datastore": self.datastore.pk,
                                      "cron": "0 4 * * *", "periodic_task": 1})]
        for path, body in cases:
            with self.subTest(path=path):
                refused = self.assert_client_error(self.post_raw(path, json.dumps(body)))
                self.assertEqual(list(refused.values()), [["unknown field"]])
        self.assert_nothing_started()

    def test_wrong_types_in_a_schedule_name_their_field(self):
        base = {"disk": self.d2.pk, "datastore": self.datastore.pk}
        cases = {"cron": [5, "every day", "61 * * * *", "* * * *", None, "0 3 * * * *"],
                 "time_zone": ["Mars/Olympus", "", 7, "../../etc/passwd"],
                 "level": ["high", 0, 23, 3.5, 10 ** 20], "mode": ["fast", 1],
                 "keep_last": [-1, "seven", 10 ** 20], "enabled": ["maybe", 2, None],
                 "grace": ["forever", -5, "-01:00:00", 10 ** 20],
                 "disk": ["/dev/sdc", "abc", 10 ** 30, -1], "datastore": [None, "/srv", 10 ** 30],
                 "kind": ["restore", None], "notify_urls": [["json://x"], {"a": 1}],
                 "confirm": ["x"]}
        for field, values in cases.items():
            for value in values:
                with self.subTest(field=field, value=value):
                    refused = self.assert_client_error(
                        self.post_raw("/api/schedules/", json.dumps({**base, field: value})))
                    self.assertIn(field, refused)
        self.assert_nothing_started()

    def test_a_schedule_that_breaks_the_models_rules_is_refused(self):
        refused = self.assert_client_error(self.post_raw("/api/schedules/", json.dumps(
            {"kind": "gc", "disk": self.d2.pk, "datastore": self.datastore.pk})))
        self.assertIn("per datastore", str(refused["disk"]))
        refused = self.assert_client_error(self.post_raw(
            f"/api/schedules/{self.schedule.pk}/", json.dumps({"disk": None}), method="patch"))
        self.assertIn("names its disk", str(refused["disk"]))
        self.assertEqual(Schedule.objects.get(pk=self.schedule.pk).disk, self.d1)

    def test_strings_with_nul_bytes_are_refused(self):
        refused = self.assert_client_error(self.post_raw(
            f"/api/images/{self.image.pk}/restore/",
            json.dumps({"target_disk": self.d2.pk, "confirm": self.d2.stable_id + "\x00"})))
        self.assertIn("confirm", refused)
        self.assert_client_error(self.post_raw(
            f"/api/schedules/{self.schedule.pk}/", json.dumps({"notify_urls": "a\x00b"}),
            method="patch"))
        self.assert_nothing_started()

    def test_ids_in_the_path_that_are_no_ids_are_not_found(self):
        for path in ("/api/disks/abc/", "/api/disks/-1/", "/api/disks/1.5/",
                     f"/api/disks/{10 ** 30}/", f"/api/jobs/{10 ** 30}/", "/api/images/%00/"):
            with self.subTest(path=path):
                self.assertEqual(self.client.get(path).status_code, 404)
        response = self.post_raw(f"/api/disks/{10 ** 30}/backup/", b"{}")
        self.assert_client_error(response, 404)

    def test_query_parameters_of_the_wrong_type_are_refused(self):
        for path in ("/api/images/?disk=abc", f"/api/images/?disk={10 ** 30}",
                     "/api/jobs/?state=nope", "/api/jobs/?disk=x", f"/api/jobs/?disk={2 ** 63}"):
            with self.subTest(path=path):
                self.assertIn("disk" if "disk" in path else "state",
                              self.assert_client_error(self.client.get(path)))
        self.assertEqual(self.client.get("/api/images/?disk=").json()["count"], 1)
        self.assert_client_error(self.client.get("/api/disks/?page=abc"), 404)

    def test_methods_the_api_does_not_offer_are_refused(self):
        for method, path in (("delete", f"/api/schedules/{self.schedule.pk}/"),
                             ("put", f"/api/schedules/{self.schedule.pk}/"),
                             ("delete", f"/api/disks/{self.d1.pk}/"),
                             ("post", "/api/disks/"), ("get", f"/api/disks/{self.d1.pk}/backup/")):
            with self.subTest(method=method, path=path):
                self.assert_client_error(self.client.generic(
                    method.upper(), path, "{}", content_type="application/json"), 405)
        self.assertTrue(Schedule.objects.filter(pk=self.schedule.pk).exists())
