"""The join command's rules, without a second machine: who may make one and revoke access, what a
token that opens nothing gets, that only the token's hash is kept, and what the command runs.
(tests/test_host_join.py joins a real second host.)"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import tarfile
from io import BytesIO
from unittest import mock

from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from support.web import PLAIN_STATIC, BaseTestCase

from webui import services
from webui.models import Host, HostAccess, Job

SHARED_CATALOG = mock.patch("webui.services.hosts._check_shared_catalog")


@override_settings(STORAGES=PLAIN_STATIC)
class JoinCommandTests(BaseTestCase):
    def invite(self, name: str = "attic"):
        self.client.force_login(self.alice)
        with SHARED_CATALOG:
            return self.client.post("/hosts/join/", {"name": name}, follow=True,
                                    HTTP_HOST="127.0.0.1:8000")

    def test_only_staff_make_join_commands_or_revoke_and_anonymous_go_to_the_login(self):
        attic = Host.objects.create(name="attic")
        for path in ("/hosts/join/", f"/hosts/{attic.pk}/revoke/"):
            anonymous = self.client.post(path, {"name": "attic"})
            self.assertEqual((anonymous.status_code, anonymous.url.split("?")[0]),
                             (302, "/accounts/login/"))
        self.client.force_login(self.bob)
        page = self.client.get("/hosts/").content.decode()
        self.assertNotIn("Make a join command", page)
        for path in ("/hosts/join/", f"/hosts/{attic.pk}/revoke/"):
            self.assertEqual(self.client.post(path, {"name": "attic"}).status_code, 403)
        self.assertFalse(HostAccess.objects.exists())

    @override_settings(ALLOWED_HOSTS=["127.0.0.1", "nas.lan"])
    def test_staff_get_a_command_once_and_only_its_hash_is_kept(self):
        page = self.invite().content.decode()
        command = re.search(r"<code>(curl -sS http://[^ ]+/join/([A-Za-z0-9_-]+)/ \| sudo sh)</code>",
                            page)
        self.assertIsNotNone(command, page)
        token = command.group(2)
        access = HostAccess.objects.get(host__name="attic")
        self.assertEqual(access.join_digest, hashlib.sha256(token.encode()).hexdigest())
        self.assertEqual(access.state(), HostAccess.State.INVITED)
        self.assertEqual(access.created_by, self.alice)
        # A browser on this machine's loopback: the command names the host as others reach it.
        self.assertTrue(command.group(1).startswith(
            f"curl -sS http://{settings.HOST_NAME}:8000/join/"))
        self.assertNotIn(token, self.client.get("/hosts/").content.decode())

        script = self.client.get(f"/join/{token}/", HTTP_HOST="nas.lan:8000")
        self.assertEqual((script.status_code, script["Content-Type"]),
                         (200, "text/x-shellscript; charset=utf-8"))
        text = script.content.decode()
        self.assertTrue(text.startswith(f"#!/bin/sh\nSERVER='http://nas.lan:8000'\nTOKEN='{token}'\n"
                                        "HOST_NAME='attic'\n"))
        self.assertIn('fetch -X POST "$SERVER/join/$TOKEN/settings"', text)

    def test_the_bundle_holds_the_workers_code_and_no_state(self):
        token = re.search(r"/join/([A-Za-z0-9_-]+)/ ", self.invite().content.decode()).group(1)
        bundle = self.client.get(f"/join/{token}/bundle.tar")
        self.assertEqual(bundle.status_code, 200)
        with tarfile.open(fileobj=BytesIO(b"".join(bundle.streaming_content))) as tar:
            names = tar.getnames()
        for needed in ("manage.py", "requirements.txt", "Makefile", "ops/join.sh",
                       "imaging/backup.py", "webui/launcher.py"):
            self.assertIn(needed, names)
        self.assertFalse([name for name in names if name.startswith(("data", "tests", ".venv"))
                          or "__pycache__" in name or name.endswith(".pyc")])

    def test_a_token_that_opens_nothing_gets_a_script_that_says_why_and_exits_1(self):
        for token, reason in (("x" * 43, "unknown or was replaced"), ("no token!", "unknown")):
            script = self.client.get(f"/join/{token}/")
            self.assertEqual(script.status_code, 404)
            self.assertRegex(script.content.decode(),
                             rf"^#!/bin/sh\necho 'join: this join command is {reason}.*' >&2\nexit 1\n$")
            self.assertEqual(self.client.get(f"/join/{token}/bundle.tar").status_code, 404)
            self.assertEqual(self.client.post(f"/join/{token}/settings").status_code, 403)
        token = re.search(r"/join/([A-Za-z0-9_-]+)/ ", self.invite().content.decode()).group(1)
        HostAccess.objects.update(join_expires=timezone.now() - dt.timedelta(seconds=1))
        expired = self.client.post(f"/join/{token}/settings")
        self.assertEqual((expired.status_code, expired.content.decode()),
                         (403, "this join command for host attic expired: make a new one on the "
                               "dashboard's Hosts page\n"))

    def test_a_join_command_is_refused_for_a_bad_name_this_host_or_a_joined_host(self):
        for name, said in (("no spaces", "is not a host name"),
                           (settings.HOST_NAME, "is this machine: its worker runs here already")):
            self.assertIn(said, self.invite(name).content.decode())
        Host.objects.create(name="joined")
        HostAccess.objects.create(host=Host.objects.get(name="joined"), joined_at=timezone.now())
        self.assertIn("host joined has joined already: revoke its access first",
                      self.invite("joined").content.decode())

    def test_a_catalog_on_sqlite_cannot_take_other_hosts(self):
        with mock.patch.dict(settings.DATABASES["default"],
                             {"ENGINE": "django.db.backends.sqlite3"}), \
                self.assertRaisesMessage(services.Refused, "other hosts share the catalog on "
                                                           "PostgreSQL, and this one is an SQLite file"):
            services.hosts.invite("attic")
        self.assertFalse(HostAccess.objects.exists())

    def test_a_revoked_host_runs_no_jobs_and_its_queued_ones_are_cancelled(self):
        queued = self.make_job(kind="backup")
        HostAccess.objects.create(host=self.h1, joined_at=timezone.now())
        # A database role is PostgreSQL's: on SQLite there is none to end.
        with mock.patch("webui.services.hosts._end_database_role") as end_role:
            self.client.force_login(self.alice)
            answer = self.client.post(f"/hosts/{self.h1.pk}/revoke/", follow=True)
        self.assertIn("Host h1 can no longer reach Redis or the catalog", answer.content.decode())
        end_role.assert_called_once_with(HostAccess.objects.get(host=self.h1).database_role)
        queued.refresh_from_db()
        self.assertEqual((queued.state, queued.error), (Job.State.CANCELLED,
                                                        "host h1's access was revoked"))
        with self.assertRaisesMessage(services.Refused, "host h1's access was revoked"):
            services.start_backup(self.d1, self.alice)
        self.assertIn('data-access="revoked"', self.client.get("/hosts/").content.decode())
