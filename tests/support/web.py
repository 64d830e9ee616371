"""The web tests' shared base: a small home lab in the database, and helpers to add to it.

`BaseTestCase.setUpTestData` creates, once per class:
- alice (staff: starts jobs, edits schedules) and bob (a user: looks only);
- host h1, seen just now, with two present disks d1 (10 GiB) and d2 (20 GiB);
- a datastore, and a daily backup schedule of d1 at 03:00 UTC created on 2026-01-01;
- `self.client` logged in as nobody (an anonymous client); log in with
  `self.client.force_login(self.alice)`.
`make_image` and `make_job` add rows with sensible defaults, keyword arguments win.
`logged_in` and `token_through_the_api` hold a live server's credentials as a browser and
a script get them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
from unittest import mock

import requests
from celery import Celery
from django.contrib.auth.models import User
from django.test import TestCase
from django.utils import timezone

from webui import services, signals
from webui.models import Datastore, Disk, Host, Image, Job, Schedule

GiB = 1024 ** 3
UTC = dt.timezone.utc
PASSWORD = "correct horse battery staple"
SCHEDULE_CREATED = dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)

# For tests that only look at what a sender would put on the channel layer.
MEMORY_LAYER = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

_stamps = itertools.count()


@contextlib.contextmanager
def enqueued():
    """Stands in for Celery's send_task: yields the (task, args, queue) of each job sent."""
    sent = []

    def record(app, name, args=None, kwargs=None, queue=None, **options):
        sent.append((name, args, queue))

    with mock.patch.object(Celery, "send_task", autospec=True, side_effect=record):
        yield sent


def logged_in(base_url: str, username: str, password: str) -> requests.Session:
    """A browser logged in through the login page: its session cookie, as the server made it."""
    browser = requests.Session()
    browser.get(f"{base_url}/accounts/login/", timeout=30).raise_for_status()
    answer = browser.post(f"{base_url}/accounts/login/", allow_redirects=False, timeout=30, data={
        "username": username, "password": password,
        "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
    assert answer.status_code == 302 and "sessionid" in browser.cookies, answer.text[:2000]
    return browser


def token_through_the_api(base_url: str, username: str, password: str) -> str:
    """An API token as a script gets it: POST /api/auth/token/ with the user's password."""
    answer = requests.post(f"{base_url}/api/auth/token/", timeout=30,
                           json={"username": username, "password": password})
    assert answer.status_code == 200, answer.text[:2000]
    return answer.json()["token"]


# The pages as rendered, their static files unhashed: no collectstatic manifest needed.
PLAIN_STATIC = {"default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
                "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}


class Outbox:
    """Stands in for Apprise: keeps what would have been sent, to which URLs."""

    def __init__(self):
        self.sent: list[tuple[tuple[str, ...], str, str]] = []

    def __call__(self):
        outbox, urls = self, []

        class Channels:
            def add(self, url):
                urls.append(url)
                return True

            def __bool__(self):
                return bool(urls)

            def notify(self, title, body):
                outbox.sent.append((tuple(urls), title, body))
                return True

        return Channels()


class LabMixin:
    """The lab's rows and helpers, for TestCase and TransactionTestCase alike."""

    @classmethod
    def create_lab(cls) -> None:
        cls.alice = User.objects.create_user("alice", "alice@example.org", PASSWORD, is_staff=True)
        cls.bob = User.objects.create_user("bob", "bob@example.org", PASSWORD)
        cls.h1 = Host.objects.create(name="h1", worker="h1@test", last_seen=timezone.now())
        cls.d1 = Disk.objects.create(host=cls.h1, stable_id="wwn-0x5000c500a1b2c3d4",
                                     model="Disk One", serial="S1", size=10 * GiB,
                                     path="/dev/sdb", kind="disk")
        cls.d2 = Disk.objects.create(host=cls.h1, stable_id="wwn-0x5000c500d4c3b2a1",
                                     model="Disk Two", serial="S2", size=20 * GiB,
                                     path="/dev/sdc", kind="disk")
        cls.datastore = Datastore.objects.create(path="/srv/datastore")
        cls.schedule = Schedule.objects.create(disk=cls.d1, datastore=cls.datastore,
                                               cron="0 3 * * *", time_zone="UTC",
                                               created=SCHEDULE_CREATED)

    def make_image(self, disk: Disk | None = None, created: dt.datetime | None = None,
                   **fields) -> Image:
        disk = disk or self.d1
        created = created or timezone.now()
        stamp = fields.pop("stamp", created.strftime("%Y-%m-%dT%H-%M-%SZ") + f"-{next(_stamps)}")
        datastore = fields.pop("datastore", self.datastore)
        values = {"size": disk.size, "stored_bytes": disk.size // 4, "new_bytes": disk.size // 8,
                  "sha256": "ab" * 32, "mode": "raw", "status": "complete", "seconds": 60.0}
        values.update(fields)
        return Image.objects.create(disk=disk, datastore=datastore, stamp=stamp, created=created,
                                    path=f"{datastore.path}/images/{disk.stable_id}/{stamp}",
                                    **values)

    def make_job(self, kind: str = "backup", state: str = Job.State.QUEUED,
                 **fields) -> Job:
        fields.setdefault("host", self.h1)
        if kind == "backup":
            fields.setdefault("disk", self.d1)
            fields.setdefault("datastore", self.datastore)
            fields.setdefault("params", {"mode": "raw", "level": 3, "force": False})
        if state != Job.State.QUEUED:
            fields.setdefault("started", timezone.now())
        if state in Job.FINISHED_STATES:
            fields.setdefault("finished", timezone.now())
        return Job.objects.create(kind=kind, state=state, **fields)


class BaseTestCase(LabMixin, TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.create_lab()

    def setUp(self) -> None:
        super().setUp()
        # TestCase rolls each test's rows back without a signal: no list cached by one
        # test may answer the next.
        services.readcache.forget_all(signals.LISTED_MODELS)
