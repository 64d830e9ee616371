"""A schedule's notification URLs (Apprise URLs carry bot tokens and mail passwords) are for
staff: a viewer learns how many there are, in the JSON API, the browsable API and the pages,
and never reads one."""
from __future__ import annotations

import json
from unittest import mock

from django.test import override_settings
from support.web import MEMORY_LAYER, PLAIN_STATIC, BaseTestCase

from webui.api.authentication import new_token
from webui.celery import app as celery_app
from webui.models import Job

BOT_TOKEN = "123456789:AAH-secret-bot-token"
MAIL_PASSWORD = "mail-password-s3cret"
URLS = f"tgram://{BOT_TOKEN}/987654\nmailto://nas:{MAIL_PASSWORD}@mail.example.org"
SECRETS = (BOT_TOKEN, MAIL_PASSWORD, "tgram://", "mailto://")


@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class NotifyUrlsTestCase(BaseTestCase):
    def setUp(self):
        super().setUp()
        self.schedule.notify_urls = URLS
        self.schedule.save()
        self.image = self.make_image(self.d1)
        self.job = self.make_job(state=Job.State.FAILED, schedule=self.schedule,
                                 error="backup failed: the disk went away")
        mock.patch.object(celery_app, "send_task").start()
        self.addCleanup(mock.patch.stopall)

    def api_paths(self) -> list[str]:
        return ["/api/schedules/", f"/api/schedules/{self.schedule.pk}/"]

    def page_paths(self) -> list[str]:
        return ["/", f"/disks/{self.d1.pk}/", "/schedules/", f"/jobs/{self.job.pk}/",
                "/hosts/", "/datastores/", f"/images/{self.image.pk}/files/"]

    def assert_no_secret(self, body: bytes, where: str) -> None:
        text = body.decode()
        for secret in SECRETS:
            self.assertNotIn(secret, text, where)

    def test_a_viewer_reads_a_count_and_no_url_in_the_json_api(self):
        self.client.force_login(self.bob)
        listed = self.client.get("/api/schedules/", HTTP_ACCEPT="application/json")
        self.assertEqual(listed.status_code, 200)
        self.assert_no_secret(listed.content, "list")
        [row] = listed.json()["results"]
        self.assertNotIn("notify_urls", row)
        self.assertEqual(row["notify_url_count"], 2)
        one = self.client.get(f"/api/schedules/{self.schedule.pk}/",
                              HTTP_ACCEPT="application/json")
        self.assert_no_secret(one.content, "detail")
        self.assertEqual(one.json()["notify_url_count"], 2)
        self.assertNotIn("notify_urls", one.json())

    def test_a_viewer_token_reads_no_url_either(self):
        auth = {"HTTP_AUTHORIZATION": f"Token {new_token(self.bob)}"}
        for path in self.api_paths():
            with self.subTest(path=path):
                response = self.client.get(path, HTTP_ACCEPT="application/json", **auth)
                self.assertEqual(response.status_code, 200)
                self.assert_no_secret(response.content, path)

    def test_the_browsable_api_its_forms_and_options_show_a_viewer_no_url(self):
        self.client.force_login(self.bob)
        for path in self.api_paths():
            with self.subTest(path=path):
                page = self.client.get(path, HTTP_ACCEPT="text/html")
                self.assertEqual(page.status_code, 200)
                self.assertIn(b"notify_url_count", page.content)
                self.assert_no_secret(page.content, path)
                options = self.client.options(path, HTTP_ACCEPT="application/json")
                self.assert_no_secret(options.content, f"OPTIONS {path}")
        schema = self.client.get("/api/schema/")
        self.assertEqual(schema.status_code, 200)
        self.assert_no_secret(schema.content, "schema")

    def test_no_page_shows_a_viewer_a_url(self):
        self.client.force_login(self.bob)
        for path in self.page_paths():
            with self.subTest(path=path):
                page = self.client.get(path)
                self.assertEqual(page.status_code, 200)
                self.assert_no_secret(page.content, path)
        self.assertEqual(self.client.get(f"/schedules/{self.schedule.pk}/").status_code, 403)

    def test_the_schedules_page_tells_everyone_how_many_urls_are_notified(self):
        for user in (self.bob, self.alice):
            self.client.force_login(user)
            html = self.client.get("/schedules/").content.decode()
            self.assertIn("notifies 2 URLs", html)

    def test_staff_read_and_edit_the_urls_as_before(self):
        self.client.force_login(self.alice)
        one = self.client.get(f"/api/schedules/{self.schedule.pk}/",
                              HTTP_ACCEPT="application/json").json()
        self.assertEqual((one["notify_urls"], one["notify_url_count"]), (URLS, 2))
        page = self.client.get(f"/api/schedules/{self.schedule.pk}/", HTTP_ACCEPT="text/html")
        self.assertIn(BOT_TOKEN, page.content.decode())
        form = self.client.get(f"/schedules/{self.schedule.pk}/").content.decode()
        self.assertIn(BOT_TOKEN, form)
        changed = self.client.patch(f"/api/schedules/{self.schedule.pk}/",
                                    json.dumps({"notify_urls": "json://hooks.example.org/x"}),
                                    content_type="application/json")
        self.assertEqual(changed.status_code, 200, changed.content)
        self.assertEqual((changed.json()["notify_urls"], changed.json()["notify_url_count"]),
                         ("json://hooks.example.org/x", 1))
