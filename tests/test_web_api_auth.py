"""Who may call what: anonymous nothing, a viewer reads, staff changes; tokens; lockouts."""
import io
import re

from django.conf import settings
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client, override_settings
from knox.models import AuthToken
from support.web import MEMORY_LAYER, PASSWORD, BaseTestCase, enqueued

from webui.api.authentication import new_token
from webui.models import Disk, Job, Schedule

# Logins are what these tests do most; a slow hash adds nothing to them.
FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, PASSWORD_HASHERS=FAST_HASHERS)
class ApiAuthTestCase(BaseTestCase):
    def setUp(self):
        cache.clear()  # the login throttle counts in the cache
        self.image = self.make_image(self.d1)
        self.job = self.make_job(state=Job.State.RUNNING)
        self.d3 = Disk.objects.create(host=self.h1, stable_id="usb-spare", size=self.d1.size)

    def readable(self):
        return ["/api/hosts/", f"/api/hosts/{self.h1.pk}/", "/api/disks/",
                f"/api/disks/{self.d1.pk}/", f"/api/images/?disk={self.d1.pk}",
                f"/api/images/{self.image.pk}/", "/api/jobs/", f"/api/jobs/{self.job.pk}/",
                "/api/schedules/", f"/api/schedules/{self.schedule.pk}/", "/api/datastores/",
                f"/api/datastores/{self.datastore.pk}/", "/api/schema/"]

    def changes(self):
        """(method, path, body) of every request that starts, stops or edits something."""
        return [
            ("post", f"/api/disks/{self.d3.pk}/backup/", {}),
            ("post", f"/api/images/{self.image.pk}/restore/",
             {"target_disk": self.d2.pk, "confirm": self.d2.stable_id}),
            ("post", f"/api/images/{self.image.pk}/verify/", {}),
            ("post", f"/api/jobs/{self.job.pk}/cancel/", {}),
            ("post", "/api/schedules/", {"disk": self.d2.pk, "datastore": self.datastore.pk,
                                         "cron": "0 4 * * *"}),
            ("patch", f"/api/schedules/{self.schedule.pk}/", {"cron": "30 1 * * *"}),
        ]

    def call(self, client, method, path, body, **headers):
        return getattr(client, method)(path, body, content_type="application/json", **headers)

    def assert_nothing_changed(self):
        self.assertEqual(Job.objects.count(), 1)
        self.assertFalse(Job.objects.get(pk=self.job.pk).cancel_requested)
        self.assertEqual(Schedule.objects.count(), 1)
        self.assertEqual(Schedule.objects.get(pk=self.schedule.pk).cron, "0 3 * * *")

    def test_it_refuses_anonymous_requests_everywhere(self):
        for path in self.readable():
            with self.subTest(path=path):
                self.assertIn(self.client.get(path).status_code, (401, 403))
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            for method, path, body in self.changes():
                with self.subTest(method=method, path=path):
                    response = self.call(self.client, method, path, body)
                    self.assertIn(response.status_code, (401, 403))
                    self.assertIn("credentials", response.json()["detail"])
        self.assertEqual(sent, [])
        self.assert_nothing_changed()

    def test_a_viewer_reads_everything(self):
        self.client.force_login(self.bob)
        for path in self.readable():
            with self.subTest(path=path):
                self.assertEqual(self.client.get(path).status_code, 200)

    def test_a_viewer_cannot_start_cancel_or_edit(self):
        self.client.force_login(self.bob)
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            for method, path, body in self.changes():
                with self.subTest(method=method, path=path):
                    response = self.call(self.client, method, path, body)
                    self.assertEqual(response.status_code, 403)
                    self.assertEqual(response.json()["detail"],
                                     "only staff may start or cancel jobs or change schedules")
        self.assertEqual(sent, [])
        self.assert_nothing_changed()

    def test_staff_can_start_cancel_and_edit(self):
        self.client.force_login(self.alice)
        expected = [202, 202, 202, 202, 201, 200]
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            for (method, path, body), status in zip(self.changes(), expected):
                with self.subTest(method=method, path=path):
                    self.assertEqual(self.call(self.client, method, path, body).status_code,
                                     status)
        self.assertEqual([name for name, _, _ in sent],
                         ["webui.tasks.run_job", "webui.tasks.run_job",
                          "webui.tasks.run_job"])
        self.assertTrue(Job.objects.get(pk=self.job.pk).cancel_requested)
        self.assertEqual(Schedule.objects.get(pk=self.schedule.pk).cron, "30 1 * * *")

    def test_a_session_must_send_its_csrf_token(self):
        client = Client(enforce_csrf_checks=True)
        client.force_login(self.alice)
        response = self.call(client, "post", f"/api/disks/{self.d2.pk}/backup/", {})
        self.assertEqual(response.status_code, 403)
        self.assertIn("CSRF", response.json()["detail"])
        self.assertEqual(Job.objects.count(), 1)

    def test_a_token_authenticates_without_a_session_or_csrf(self):
        out = io.StringIO()
        call_command("drf_create_token", "alice", stdout=out)
        key = re.fullmatch(r"Generated token ([0-9a-f]{64}) for user alice\n", out.getvalue())[1]
        client = Client(enforce_csrf_checks=True)
        with enqueued() as sent, self.captureOnCommitCallbacks(execute=True):
            response = self.call(client, "post", f"/api/disks/{self.d2.pk}/backup/", {},
                                 HTTP_AUTHORIZATION=f"Token {key}")
        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(Job.objects.get(pk=response.json()["job"]).requested_by, self.alice)
        self.assertEqual(len(sent), 1)

    def test_a_viewer_token_reads_but_cannot_start(self):
        key = new_token(self.bob)
        auth = {"HTTP_AUTHORIZATION": f"Token {key}"}
        self.assertEqual(self.client.get("/api/disks/", **auth).status_code, 200)
        response = self.call(self.client, "post", f"/api/disks/{self.d2.pk}/backup/", {}, **auth)
        self.assertEqual(response.status_code, 403)

    def test_it_refuses_a_wrong_token(self):
        response = self.client.get("/api/disks/", HTTP_AUTHORIZATION="Token " + "0" * 40)
        self.assertIn(response.status_code, (401, 403))
        self.assertEqual(response.json()["detail"], "Invalid token.")

    def test_the_token_endpoint_trades_a_password_for_a_new_token(self):
        tokens = []
        for _ in range(2):
            response = self.call(self.client, "post", "/api/auth/token/",
                                 {"username": "alice", "password": PASSWORD})
            self.assertEqual(response.status_code, 200)
            self.assertEqual(list(response.json()), ["token"])
            tokens.append(response.json()["token"])
        self.assertNotEqual(tokens[0], tokens[1])
        for token in tokens:  # the first still works
            answer = self.client.get("/api/disks/", HTTP_AUTHORIZATION=f"Token {token}")
            self.assertEqual(answer.status_code, 200)
        self.assertEqual(AuthToken.objects.filter(user=self.alice).count(), 2)
        response = self.call(self.client, "post", "/api/auth/token/",
                             {"username": "alice", "password": "wrong"})
        self.assertEqual(response.status_code, 400)
        self.assertNotIn("token", response.json())

    def test_axes_locks_the_address_out_after_the_configured_failures(self):
        wrong = {"username": "alice", "password": "guess"}
        statuses = [self.call(self.client, "post", "/api/auth/token/", wrong).status_code
                     for _ in range(settings.AXES_FAILURE_LIMIT)]
        self.assertEqual(statuses, [400] * (settings.AXES_FAILURE_LIMIT - 1) + [429])
        right = self.call(self.client, "post", "/api/auth/token/",
                          {"username": "alice", "password": PASSWORD})
        self.assertEqual(right.status_code, 429, "the right password must not open a lockout")
        self.assertIn("locked", right.content.decode())
        self.assertFalse(AuthToken.objects.filter(user=self.alice).exists())
        # Every username is locked out at that address, so that guesses cannot move on to
        # the next one; from another address alice logs in.
        other = self.call(self.client, "post", "/api/auth/token/",
                          {"username": "bob", "password": PASSWORD})
        self.assertEqual(other.status_code, 429)
        elsewhere = self.call(self.client, "post", "/api/auth/token/",
                              {"username": "alice", "password": PASSWORD},
                              REMOTE_ADDR="192.0.2.7")
        self.assertEqual(elsewhere.status_code, 200)

    @override_settings(AXES_FAILURE_LIMIT=100)  # the address's lockout out of the way
    def test_the_token_endpoint_is_throttled_across_usernames(self):
        statuses = [self.call(self.client, "post", "/api/auth/token/",
                              {"username": f"user{n}", "password": "guess"}).status_code
                    for n in range(11)]
        self.assertEqual(statuses, [400] * 10 + [429])
