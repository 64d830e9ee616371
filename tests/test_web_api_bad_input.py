"""Whatever a client sends, the API answers 4xx with a JSON reason, never 5xx."""
import json
from unittest import mock

import requests
from django.conf import settings
from django.contrib.auth.models import User
from django.test import override_settings
from support.web import MEMORY_LAYER, PASSWORD, PLAIN_STATIC, BaseTestCase

from webui.api.authentication import new_token
from webui.api.views import ObtainTokenView
from webui.models import Job, Schedule

MiB = 1024 * 1024
LOCAL_CACHE = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                           "LOCATION": "hostile-json"}}
# Bodies no endpoint takes: nested past any use (a RecursionError in Python's parser, once),
# numbers past what JSON, Python or a column holds, constants JSON does not have, text
# that is not UTF-8, fields of every endpoint with values of the wrong size or type.
HOSTILE_BODIES = [
    b"[" * 100_000,
    b'{"a": ' * 50_000,
    b"[" * 5_000 + b"]" * 5_000,
    b'{"mode": ' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"username": ' + b'{"a": ' * 300 + b"1" + b"}" * 301,
    b"9" * 5_000,
    b"NaN", b'{"level": Infinity}', b'{"level": -Infinity}', b'{"level": 1e999}',
    b'{"level": -1e999}', b'{"level": ' + b"9" * 4_000 + b"}",
    b'{"level": 1.5e308, "mode": "raw"}',
    b'{"target_disk": ' + b"9" * 30 + b', "confirm": "x"}',
    b'{"target_disk": 1e999, "confirm": "x", "partition": ' + b"9" * 40 + b"}",
    b'{"datastore": ' + b"9" * 30 + b"}", b'{"datastore": -1e999}',
    b'{"cron": "0 3 * * *", "grace": "999999999999 00:00:00"}',
    b'{"grace": "99999999999999999999"}', b'{"grace": 1e999}',
    b'{"keep_last": ' + b"9" * 30 + b"}", b'{"disk": ' + b"9" * 30 + b"}",
    b'{"username": ' + b"9" * 4_000 + b', "password": "x"}',
    b'{"username": "' + b"u" * 10_000 + b'", "password": "x"}',
    b'{"username": ["alice"], "password": {"p": 1}}', b'{"username": null, "password": 1e999}',
    b'"\\ud800"', b'{"username": "\\ud800", "password": "x"}', b'{"cron": "\\udc00 3 * * *"}',
    b'{"target_disk": 2, "confirm": "\\ud800"}', b'{"\\ud800": 1}',
    b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"{}" * 1000, b"null",
]


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


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, CACHES=LOCAL_CACHE, STORAGES=PLAIN_STATIC)
class HostileJsonTestCase(BaseTestCase):
    """Every endpoint that reads a JSON body, for anyone: 4xx, a reason, nothing changed."""

    def setUp(self):
        super().setUp()
        # Every body reaches the token endpoint's parser, not the throttle's 429 before it.
        mock.patch.object(ObtainTokenView, "throttle_classes", []).start()
        self.addCleanup(mock.patch.stopall)
        self.image = self.make_image(self.d1)
        self.job = self.make_job(state=Job.State.RUNNING)

    def json_endpoints(self):
        return [("post", "/api/auth/token/"), ("post", f"/api/disks/{self.d2.pk}/backup/"),
                ("post", f"/api/images/{self.image.pk}/restore/"),
                ("post", f"/api/images/{self.image.pk}/verify/"),
                ("post", f"/api/jobs/{self.job.pk}/cancel/"), ("post", "/api/schedules/"),
                ("patch", f"/api/schedules/{self.schedule.pk}/")]

    def assert_refused_with_a_reason(self, response):
        self.assertTrue(400 <= response.status_code < 500, response.content[:300])
        self.assertEqual(response["Content-Type"], "application/json")
        reasons = list(strings_in(response.json()))
        self.assertTrue(reasons, response.content[:300])
        for reason in reasons:
            self.assertNotIn("\n", reason)

    def test_no_body_fails_the_server_for_anonymous_viewer_or_staff(self):
        for user in (None, self.bob, self.alice):
            self.client.logout()
            if user is not None:
                self.client.force_login(user)
            for method, path in self.json_endpoints():
                for body in HOSTILE_BODIES:
                    with self.subTest(user=user, method=method, path=path, body=body[:40]):
                        response = getattr(self.client, method)(
                            path, body, content_type="application/json")
                        self.assert_refused_with_a_reason(response)
        self.assertEqual(list(Job.objects.values_list("pk", "cancel_requested")),
                         [(self.job.pk, False)])
        self.assertEqual(Schedule.objects.get().cron, "0 3 * * *")
        self.assertFalse(Schedule.objects.exclude(pk=self.schedule.pk).exists())

    def test_the_pages_that_read_a_body_take_any_json_without_failing(self):
        paths = ["/accounts/login/", "/admin/login/", "/schedules/new/",
                 f"/schedules/{self.schedule.pk}/", f"/images/{self.image.pk}/export/"]
        for user in (None, self.bob, self.alice):
            self.client.logout()
            if user is not None:
                self.client.force_login(user)
            for path in paths:
                # They read forms, never JSON: a few bodies of each kind tell as much as all.
                for body in HOSTILE_BODIES[::4]:
                    with self.subTest(user=user, path=path, body=body[:40]):
                        response = self.client.post(path, body, content_type="application/json")
                        self.assertLess(response.status_code, 500)
        self.assertEqual(Schedule.objects.get().cron, "0 3 * * *")
        self.assertEqual(list(Job.objects.values_list("pk", flat=True)), [self.job.pk])

    def test_deep_nesting_is_refused_by_name(self):
        self.client.force_login(self.alice)
        for body in (b"[" * 100_000, b"[" * 21 + b"]" * 21,
                     b'{"mode": ' + b"[" * 300 + b"]" * 300 + b"}"):
            with self.subTest(body=body[:20]):
                response = self.client.post(f"/api/disks/{self.d2.pk}/backup/", body,
                                            content_type="application/json")
                self.assertEqual(response.status_code, 400)
                self.assertEqual(response.json()["detail"],
                                 "JSON parse error - nested deeper than 20 levels")
        # Twenty levels parse; the serializer then says what is wrong with them.
        response = self.client.post(f"/api/disks/{self.d2.pk}/backup/",
                                    b'{"mode": ' + b"[" * 19 + b"]" * 19 + b"}",
                                    content_type="application/json")
        self.assertEqual(response.status_code, 400)
        self.assertIn("mode", response.json())

    def test_numbers_json_cannot_hold_are_refused_by_name(self):
        self.client.force_login(self.alice)
        for body in (b'{"level": 1e999}', b'{"level": -1e400}', b"NaN", b'{"level": Infinity}'):
            with self.subTest(body=body):
                response = self.client.post(f"/api/disks/{self.d2.pk}/backup/", body,
                                            content_type="application/json")
                self.assertEqual(response.status_code, 400)
                self.assertIn("JSON parse error", response.json()["detail"])
        self.assertEqual(list(Job.objects.values_list("pk", flat=True)), [self.job.pk])


def strings_in(value):
    """Every string in a decoded JSON answer."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def test_the_live_server_answers_deep_json_with_400_and_logs_no_traceback(
        private_redis, live_server_process):
    server = live_server_process
    tokens = {None: None,
              "viewer": new_token(User.objects.create_user("bob", password=PASSWORD)),
              "staff": new_token(User.objects.create_user("alice", password=PASSWORD,
                                                          is_staff=True))}
    deep = b"[" * 100_000
    calls = [(None, "/api/auth/token/", 400), ("viewer", "/api/auth/token/", 400),
             ("staff", "/api/auth/token/", 400), ("viewer", "/api/schedules/", 403),
             ("staff", "/api/schedules/", 400)]
    for user, path, status in calls:
        headers = {"Content-Type": "application/json"}
        if user is not None:
            headers["Authorization"] = f"Token {tokens[user]}"
        response = requests.post(f"{server.url}{path}", data=deep, headers=headers, timeout=30)
        assert response.status_code == status, (user, path, response.text[:300])
        assert "\n" not in response.json()["detail"]
    assert server.alive()
    log = server.log()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
