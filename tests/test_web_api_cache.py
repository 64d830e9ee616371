"""The API's lists come from the cache while their rows are unchanged, and never outlive a write.

Every kind of write counts: a save, a queryset update, a bulk_create, a delete, in this
process or in another one (the live server's lists, changed by this test process's ORM).
"""
import datetime as dt
import hashlib
import http.client
import json

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from knox.models import AuthToken
from support.web import GiB, BaseTestCase, LabMixin

from webui.api.authentication import new_token
from webui.api.serializers import IMAGE_COLUMNS, ImageSerializer, image_listing
from webui.models import Disk, Image, Job, Schedule
from webui.services import readcache
from webui.signals import LISTED_MODELS

# A Redis that is not there: nothing listens on port 1.
NO_REDIS = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                        "LOCATION": "redis://127.0.0.1:1/0",
                        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}


class CachedListTestCase(BaseTestCase):
    def setUp(self):
        # What an earlier test cached was rolled back with its rows, which no signal tells.
        readcache.forget_all(LISTED_MODELS)
        self.client.force_login(self.bob)

    def get(self, path):
        response = self.client.get(path)
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()

    def images_of(self, disk):
        return self.get(f"/api/images/?disk={disk.pk}")

    def disk_row(self, disk):
        return next(row for row in self.get("/api/disks/")["results"] if row["id"] == disk.pk)

    def test_it_answers_a_repeated_list_from_the_cache(self):
        self.make_image()
        path = f"/api/images/?disk={self.d1.pk}"
        first = self.get(path)
        with CaptureQueriesContext(connection) as queries:
            second = self.get(path)
        self.assertEqual(second, first)
        self.assertFalse([query for query in queries if "webui_image" in query["sql"]],
                         "the second list read the images table again")

    def test_a_new_image_is_in_the_next_list(self):
        self.assertEqual(self.images_of(self.d1)["count"], 0)
        image = self.make_image()
        listed = self.images_of(self.d1)
        self.assertEqual(listed["count"], 1)
        self.assertEqual(listed["results"][0]["id"], image.pk)
        self.assertEqual(self.disk_row(self.d1)["last_backup"],
                         image.created.isoformat().replace("+00:00", "Z"))

    def test_images_written_in_bulk_or_updated_through_a_queryset_are_in_the_next_list(self):
        image = self.make_image()
        self.assertFalse(self.images_of(self.d1)["results"][0]["verified"])
        Image.objects.filter(pk=image.pk).update(verify_ok=True)
        self.assertTrue(self.images_of(self.d1)["results"][0]["verified"])
        Image.objects.bulk_create([Image(
            disk=self.d1, datastore=self.datastore, stamp=f"bulk-{n}", path=f"/srv/bulk-{n}",
            created=timezone.now() - dt.timedelta(days=n + 1)) for n in range(3)])
        self.assertEqual(self.images_of(self.d1)["count"], 4)

    def test_a_deleted_image_is_gone_from_the_next_list(self):
        kept, deleted = self.make_image(), self.make_image()
        self.assertEqual(self.images_of(self.d1)["count"], 2)
        deleted.delete()
        self.assertEqual([row["id"] for row in self.images_of(self.d1)["results"]], [kept.pk])
        Image.objects.filter(pk=kept.pk).delete()
        self.assertEqual(self.images_of(self.d1)["count"], 0)

    def test_a_failed_backup_recorded_by_a_queryset_update_shows_in_the_disks_list(self):
        job = self.make_job(state=Job.State.RUNNING)
        self.assertNotEqual(self.disk_row(self.d1)["protection"], "failed")
        Job.objects.filter(pk=job.pk).update(state=Job.State.FAILED, finished=timezone.now())
        self.assertEqual(self.disk_row(self.d1)["protection"], "failed")

    def test_disks_schedules_and_hosts_written_show_in_the_next_disks_list(self):
        self.assertEqual(self.disk_row(self.d2)["protection"], "unscheduled")
        Schedule.objects.create(disk=self.d2, datastore=self.datastore, cron="0 4 * * *")
        self.assertNotEqual(self.disk_row(self.d2)["protection"], "unscheduled")
        Disk.objects.filter(pk=self.d2.pk).update(present=False)
        self.assertFalse(self.disk_row(self.d2)["present"])
        self.h1.name = "renamed"
        self.h1.save()
        self.assertEqual(self.disk_row(self.d2)["host"], "renamed")
        Disk.objects.create(host=self.h1, stable_id="new-disk", size=GiB, path="/dev/sdz")
        self.assertEqual(self.get("/api/disks/")["count"], 3)

    def test_a_write_committed_later_is_seen_after_the_commit(self):
        path = f"/api/images/?disk={self.d1.pk}"
        self.assertEqual(self.get(path)["count"], 0)
        with self.captureOnCommitCallbacks(execute=True):
            self.make_image()
            # Another process's read between the write and its commit, which cannot see the
            # image yet: what it stores must not answer once the write is committed.
            readcache.cached(f"http://testserver{path}", [Image],
                                 lambda: {"count": 0, "results": []})
        self.assertEqual(self.get(path)["count"], 1)

    def test_each_query_is_a_list_of_its_own(self):
        for _ in range(3):
            self.make_image(self.d2)
        self.assertEqual(self.images_of(self.d1)["count"], 0)
        self.assertEqual(self.images_of(self.d2)["count"], 3)
        self.assertEqual(self.get("/api/images/")["count"], 3)
        self.assertEqual(self.client.get("/api/images/?disk=x").status_code, 400)
        self.assertEqual(self.client.get("/api/images/?disk=x").status_code, 400)

    def test_anonymous_clients_get_no_cached_list(self):
        self.get("/api/disks/")
        self.client.logout()
        self.assertIn(self.client.get("/api/disks/").status_code, (401, 403))

    def test_the_fast_image_listing_is_what_the_image_serializer_shows(self):
        created = timezone.now().replace(microsecond=123456)
        self.make_image(created=created, verify_ok=True, verified_at=created)
        self.make_image(created=created - dt.timedelta(days=1), verify_ok=False)
        self.make_image(created=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                        bad_bytes=4096, seconds=1.5)
        images = Image.objects.filter(disk=self.d1)
        self.assertEqual(image_listing(images.values(*IMAGE_COLUMNS)),
                         ImageSerializer(images, many=True).data)

    @override_settings(CACHES=NO_REDIS)
    def test_lists_are_answered_while_the_cache_does_not_answer(self):
        self.make_image()
        self.assertEqual(self.images_of(self.d1)["count"], 1)
        self.make_image()
        self.assertEqual(self.images_of(self.d1)["count"], 2)

    @override_settings(API_CACHE_SECONDS=0)
    def test_no_list_is_cached_when_the_cache_time_is_zero(self):
        self.get("/api/disks/")
        with CaptureQueriesContext(connection) as queries:
            self.get("/api/disks/")
        self.assertTrue([query for query in queries if "webui_disk" in query["sql"]])


class TokenReadTestCase(BaseTestCase):
    """Who a token belongs to is cached for reads, and forgotten when the token or user changes."""

    def setUp(self):
        readcache.forget_all(LISTED_MODELS)
        self.token = new_token(self.bob)

    def refused(self, status):
        # 403 rather than 401: session authentication comes first, and sends no challenge.
        return status in (401, 403)

    def status(self, method="get", path="/api/disks/"):
        answer = getattr(self.client, method)(path, HTTP_AUTHORIZATION=f"Token {self.token}",
                                              content_type="application/json")
        return answer.status_code

    def test_a_read_with_a_known_token_asks_the_database_once(self):
        self.assertEqual(self.status(), 200)
        with CaptureQueriesContext(connection) as queries:
            self.assertEqual(self.status(), 200)
        self.assertEqual(list(queries), [], "a cached read still asked the database")

    def test_a_deleted_token_is_refused_at_the_next_read(self):
        self.assertEqual(self.status(), 200)
        AuthToken.objects.filter(user=self.bob).delete()
        self.assertTrue(self.refused(self.status()))

    def test_a_deactivated_user_is_refused_at_the_next_read(self):
        self.assertEqual(self.status(), 200)
        self.bob.is_active = False
        self.bob.save()
        self.assertTrue(self.refused(self.status()))

    def test_an_unknown_token_is_refused_every_time(self):
        self.token = "0" * 64
        for _ in range(2):
            self.assertTrue(self.refused(self.status()))

    def test_a_request_that_changes_something_always_asks_the_database(self):
        self.token = new_token(self.alice)  # staff: may start a backup
        self.assertEqual(self.status(), 200)
        with connection.cursor() as cursor:  # behind the ORM's back: no signal, no new version
            cursor.execute(f"DELETE FROM {AuthToken._meta.db_table}")
        self.assertEqual(self.status(), 200)  # a read: up to API_CACHE_SECONDS behind
        self.assertTrue(self.refused(self.status("post", f"/api/disks/{self.d1.pk}/backup/")))

    def test_the_cached_user_holds_no_password(self):
        self.assertEqual(self.status(), 200)
        fields = readcache.cached(
            f"token-user:{hashlib.sha256(self.token.encode()).hexdigest()}",
            (AuthToken, User), lambda: self.fail("not cached"))
        self.assertEqual(fields["id"], self.bob.pk)
        self.assertNotIn("password", fields)


@pytest.mark.django_db(transaction=True)
def test_the_live_servers_lists_show_what_another_process_writes(live_server_process):
    """The server's processes and this one share the cache: a write here reaches its lists."""
    class Lab(LabMixin):
        pass

    Lab.create_lab()
    lab = Lab()
    token = new_token(lab.bob)
    disk = lab.d1
    connection_ = http.client.HTTPConnection("127.0.0.1", live_server_process.port, timeout=30)

    def listed() -> dict:
        connection_.request("GET", f"/api/images/?disk={disk.pk}",
                            headers={"Authorization": f"Token {token}"})
        response = connection_.getresponse()
        body = response.read()
        assert response.status == 200, body
        return json.loads(body)

    try:
        assert listed()["count"] == 0
        assert listed()["count"] == 0  # now from the cache
        image = lab.make_image(disk)
        assert [row["id"] for row in listed()["results"]] == [image.pk]
        Image.objects.filter(pk=image.pk).update(verify_ok=True)
        assert listed()["results"][0]["verified"] is True
    finally:
        connection_.close()
