"""Nothing the web server or a worker reads from Redis runs as code, and no entry there is
believed without the server's key.

A writer to Redis (a local user, with or without its password) plants a pickle whose
unpickling would create a marker file into every key the app reads: the cache's list entries,
the users of API tokens, the version keys, the token endpoint's throttle history; a pickled
task and a pickled remote-control command on a live worker's queues; pickles and other
garbage on every channel the live server listens to. Then the app reads them all, as a viewer
with a token and with a session, a script fetching a token, a worker, a WebSocket watcher: no
marker appears, answers are what they were, nothing answers 5xx. An entry copied from another
user's token, or altered, is not believed. All through a private redis-server, so that no
other test run sharing the machine's Redis reads what is planted.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery
from celery.events import EventReceiver
from django.contrib.auth.models import User
from django.core.cache import caches
from django.test import override_settings
from knox.models import AuthToken
from support.services import wait_for
from support.web import PASSWORD, LabMixin, logged_in, token_through_the_api
from websockets.sync.client import connect

from webui.api.authentication import new_token
from webui.celery import app as celery_app
from webui.models import Job
from webui.progress import send_job_state
from webui.services import readcache
from webui.testing import RedisServer

LISTS = ("/api/disks/", "/api/images/", "/api/images/?disk={disk}", "/api/hosts/")


class Planted:
    """Unpickled anywhere, it creates its marker file: the proof that Redis ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Markers:
    """One marker per planted key, so that a failure names the keys that ran code."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.planted: dict[str, str] = {}

    def pickle_for(self, where: str) -> bytes:
        name = hashlib.sha256(where.encode()).hexdigest()[:16]
        self.planted[name] = where
        return pickle.dumps(Planted(self.folder / name))

    def ran(self) -> list[str]:
        return sorted(self.planted.get(path.name, path.name) for path in self.folder.iterdir())


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path, tmp_path / "redis.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_environment(live_environment, private_redis, settings):
    """The live server, the workers and this process on the private Redis."""
    live_environment["REDIS_URL"] = private_redis.url
    settings.REDIS_URL = settings.CELERY_BROKER_URL = private_redis.url
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    layer = settings.CHANNEL_LAYERS["default"]
    settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": {**layer.get("CONFIG", {}),
                                                              "hosts": [private_redis.url]}}}
    return live_environment


@pytest.fixture
def markers(tmp_path):
    folder = tmp_path / "markers"
    folder.mkdir()
    return Markers(folder)


@pytest.fixture
def store(private_redis):
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@pytest.fixture
def lab():
    class Lab(LabMixin):
        pass

    Lab.create_lab()
    lab = Lab()
    lab.make_image(lab.d1)
    lab.make_image(lab.d2)
    User.objects.filter(pk=lab.alice.pk).update(is_superuser=True)
    return lab


def token_entry_key(token: str) -> str:
    """The Redis key under which the server keeps who `token` belongs to."""
    name = f"token-user:{hashlib.sha256(token.encode()).hexdigest()}"
    return caches["default"].make_key(readcache._entry_key(name))


def answer(response: requests.Response):
    if response.headers.get("Content-Type", "").startswith("application/json"):
        return response.status_code, response.json()
    return response.status_code, response.text


def test_no_cache_entry_runs_code_or_is_believed(live_server_process, lab, store, markers):
    server = live_server_process.url
    alice_token = token_through_the_api(server, "alice", PASSWORD)
    bob_token = token_through_the_api(server, "bob", PASSWORD)
    bob_browser = logged_in(server, "bob", PASSWORD)

    def with_token(token: str) -> dict[str, str]:
        return {"Authorization": f"Token {token}", "Accept": "application/json"}

    def as_html(token: str) -> str:
        status, page = answer(requests.get(f"{server}/api/disks/", timeout=30,
                                           headers={**with_token(token), "Accept": "text/html"}))
        return page if status == 200 else f"{status}: {page[:2000]}"

    def reads() -> dict:
        answers = {}
        for path in (path.format(disk=lab.d1.pk) for path in LISTS):
            for who, token in (("bob", bob_token), ("alice", alice_token)):
                answers[who, "token", path] = answer(
                    requests.get(f"{server}{path}", headers=with_token(token), timeout=30))
            answers["bob", "session", path] = answer(bob_browser.get(f"{server}{path}", timeout=30))
        return answers

    expected = reads()
    assert {status for status, _ in expected.values()} == {200}
    assert expected["bob", "token", "/api/images/"][1]["count"] == 2
    assert reads() == expected  # from the cache this time

    # Copied: bob's token said to be alice's (a superuser), and a token nobody was given.
    alice_entry = store.get(token_entry_key(alice_token))
    assert alice_entry is not None, "the server cached no user for alice's token"
    store.set(token_entry_key(bob_token), alice_entry)
    made_up = secrets.token_hex(32)
    store.set(token_entry_key(made_up), alice_entry)
    page = as_html(bob_token)
    assert "bob" in page and "alice" not in page, "bob's token was taken for alice's"
    refused = requests.get(f"{server}/api/disks/", headers=with_token(made_up), timeout=30)
    assert refused.status_code in (401, 403), refused.text
    # Altered: one byte of alice's entry changed.
    altered = bytearray(alice_entry)
    altered[len(altered) // 2] ^= 0x01
    store.set(token_entry_key(alice_token), bytes(altered))
    assert "alice" in as_html(alice_token)
    assert reads() == expected

    cache_keys = [key.decode() for key in store.scan_iter() if store.type(key) == b"string"]
    assert any("throttle" in key for key in cache_keys), cache_keys
    assert any(key.endswith(token_entry_key(bob_token)) for key in cache_keys), cache_keys
    for plant in (markers.pickle_for, lambda key: json.dumps(["not", {"what": "was"}]).encode()):
        for key in cache_keys:
            store.set(key, plant(key))
        after = reads()
        page = as_html(bob_token)
        made_up_status = requests.get(f"{server}/api/disks/", headers=with_token(made_up),
                                      timeout=30).status_code
        fetched = requests.post(f"{server}/api/auth/token/", timeout=30,  # reads the throttle
                                json={"username": "bob", "password": PASSWORD})
        assert markers.ran() == [], f"unpickled from Redis: {markers.ran()}"
        assert after == expected
        assert "bob" in page
        assert made_up_status in (401, 403)
        assert fetched.status_code == 200, fetched.text[:2000]
        fresh = with_token(fetched.json()["token"])
        assert requests.get(f"{server}/api/disks/", headers=fresh, timeout=30).status_code == 200
    assert "Traceback" not in live_server_process.log(), live_server_process.log()[-3000:]


def test_a_live_worker_refuses_pickled_tasks_and_control_commands(celery_worker, lab, store,
                                                                  private_redis, markers):
    worker = celery_worker(f"nopickle-{os.getpid()}")
    queue = f"host.{worker.host_name}"
    # A writer to Redis sending pickles, as Celery lets any client do.
    writer = Celery("writer", broker=private_redis.url, set_as_current=False)
    writer.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    honest = Celery("honest", broker=private_redis.url, set_as_current=False)
    try:
        writer.send_task("webui.tasks.report_inventory", args=(Planted(markers.folder / "task"),),
                         queue=queue)
        markers.planted["task"] = f"a pickled task on {queue}"
        writer.control.broadcast("ping", arguments={"x": Planted(markers.folder / "control")},
                                 destination=[worker.node_name])
        markers.planted["control"] = "a pickled remote-control command"
        wait_for(lambda: store.llen(queue) == 0, "the pickled task taken", 30, worker)

        # The worker goes on with what is JSON: a task, a ping.
        sent = honest.send_task("webui.tasks.report_inventory", queue=queue)
        wait_for(lambda: f"Task webui.tasks.report_inventory[{sent.id}] succeeded" in worker.log(),
                 "the JSON task done", 30, worker)
        replies = honest.control.ping(destination=[worker.node_name], timeout=10)
        assert replies == [{worker.node_name: {"ok": "pong"}}], replies
        refusal = "Refusing to deserialize untrusted content of type pickle"
        assert f"Received invalid task message: {refusal}" in worker.log()
        assert f"Can't decode message body: ContentDisallowed('{refusal}" in worker.log()
    finally:
        writer.close()
        honest.close()
    assert worker.alive()
    assert markers.ran() == [], f"unpickled by the worker: {markers.ran()}"


def test_every_celery_reader_accepts_json_only():
    """Tasks, remote control, events and results: what a worker or a client would decode."""
    conf = celery_app.conf
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content or conf.accept_content) == ["json"]
    assert list(celery_app.control.mailbox.accept) == ["json"]
    receiver = EventReceiver(celery_app.connection_for_read(), handlers={})
    assert set(receiver.accept) == {"json"}
    assert conf.event_serializer == conf.task_serializer == conf.result_serializer == "json"


def test_a_websocket_watcher_reads_no_pickle_from_the_channel_layer(live_server_process, lab,
                                                                    store, markers):
    server = live_server_process
    job = lab.make_job(state=Job.State.RUNNING)
    browser = logged_in(server.url, "bob", PASSWORD)
    cookie = f"sessionid={browser.cookies['sessionid']}"
    with connect(f"ws://127.0.0.1:{server.port}/ws/dashboard/", origin=server.url,
                 additional_headers={"Cookie": cookie}, open_timeout=10) as socket:
        channels = wait_for(lambda: [name.decode() for name in store.pubsub_channels()],
                            "a channel the server listens to", 10, server)
        assert any("dashboard" in name for name in channels), channels
        for name in channels:
            for garbage in (markers.pickle_for(name), b"\x00\xff not a message",
                            json.dumps([1, 2]).encode(),
                            json.dumps({"type": "no.such.event"}).encode()):
                store.publish(name, garbage)
        send_job_state(job)
        event = json.loads(socket.recv(timeout=10))
        assert (event["id"], event["state"]) == (job.pk, Job.State.RUNNING)
    assert markers.ran() == [], f"unpickled from the channel layer: {markers.ran()}"
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.django_db
def test_an_entry_signed_without_the_servers_key_is_not_believed(client):
    """What an attacker who knows the code, but not SECRET_KEY, would store for bob's token."""
    bob = User.objects.create_user("bob", password=PASSWORD)
    token = new_token(bob)
    name = f"token-user:{hashlib.sha256(token.encode()).hexdigest()}"
    with override_settings(SECRET_KEY="what-an-attacker-guesses-" + "x" * 40):
        readcache.cached(name, (AuthToken, User), lambda: {
            "id": bob.pk, "username": "root", "is_active": True, "is_staff": True,
            "is_superuser": True})
    answer = client.get("/api/disks/", HTTP_AUTHORIZATION=f"Token {token}")
    assert answer.status_code == 200
    user = answer.wsgi_request.user
    assert (user.username, user.is_staff, user.is_superuser) == ("bob", False, False)
