"""WebSockets through the real ASGI application: origin check, session auth, snapshot, events."""
import json

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import Client
from imaging.base.progress import ProgressEvent
from support.web import MEMORY_LAYER

from webui.asgi import application
from webui.models import Host, Job
from webui.progress import ProgressSender, send_job_state

ORIGIN = (b"origin", b"http://localhost")
HOST = (b"host", b"localhost")  # what a browser sends with that Origin

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


class WebsocketCommunicator(ApplicationCommunicator):
    """A WebSocket client of an ASGI application in the test's event loop: what
    channels.testing offers, which cannot be imported without daphne installed."""

    def __init__(self, app, path, headers=()):
        super().__init__(app, {"type": "websocket", "path": path, "query_string": b"",
                               "headers": [HOST, *headers], "subprotocols": []})

    async def connect(self, timeout=2):
        await self.send_input({"type": "websocket.connect"})
        answer = await self.receive_output(timeout)
        return answer["type"] == "websocket.accept", answer.get("code")

    async def receive_json_from(self, timeout=2):
        answer = await self.receive_output(timeout)
        assert answer["type"] == "websocket.send", answer
        return json.loads(answer["text"])

    async def send_json_to(self, data):
        await self.send_to(text_data=json.dumps(data))

    async def send_to(self, text_data):
        await self.send_input({"type": "websocket.receive", "text": text_data})

    async def disconnect(self, code=1000, timeout=2):
        await self.send_input({"type": "websocket.disconnect", "code": code})
        await self.wait(timeout)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def memory_layer(settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER


@pytest.fixture
def bob_cookie():
    """A logged-in viewer's session cookie, as a browser would send it."""
    bob = User.objects.create_user("bob", password="bob-password-1")
    client = Client()
    client.force_login(bob, backend="django.contrib.auth.backends.ModelBackend")
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


@pytest.fixture
def job():
    host = Host.objects.create(name="h1")
    return Job.objects.create(kind="backup", host=host, state=Job.State.RUNNING,
                              progress={"phase": "backup", "done": 7, "total": 10})


def event(done, finished=False):
    return ProgressEvent(phase="backup", done=done, total=100, rate=5.0, eta=2.0, elapsed=1.0,
                         stored_bytes=3, new_bytes=2, finished=finished)


@database_sync_to_async
def report_progress(job_id, *events):
    with ProgressSender(job_id, send_seconds=0) as sender:
        for each in events:
            sender(each)


@database_sync_to_async
def announce(job_id):
    send_job_state(Job.objects.select_related("host").get(pk=job_id))


@database_sync_to_async
def api_view_of(job_id, cookie):
    client = Client(HTTP_COOKIE=cookie[1].decode())
    return json.loads(client.get(f"/api/jobs/{job_id}/").content)


async def refused(path, headers):
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return not connected


async def test_it_refuses_an_anonymous_client(memory_layer, job):
    assert await refused(f"/ws/jobs/{job.pk}/", [ORIGIN])
    assert await refused("/ws/dashboard/", [ORIGIN])


async def test_it_refuses_a_foreign_or_missing_origin(memory_layer, job, bob_cookie):
    for headers in ([(b"origin", b"http://evil.example"), bob_cookie], [bob_cookie]):
        assert await refused(f"/ws/jobs/{job.pk}/", headers)
        assert await refused("/ws/dashboard/", headers)


async def test_it_refuses_an_unknown_job(memory_layer, job, bob_cookie):
    assert await refused(f"/ws/jobs/{job.pk + 1000}/", [ORIGIN, bob_cookie])


async def test_it_sends_the_snapshot_first_then_progress_and_states(memory_layer, job, bob_cookie):
    communicator = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                         headers=[ORIGIN, bob_cookie])
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from()
    assert snapshot == await api_view_of(job.pk, bob_cookie)
    assert snapshot["progress"]["done"] == 7 and snapshot["state"] == "running"

    await report_progress(job.pk, event(40), event(100, finished=True))
    first, last = await communicator.receive_json_from(), await communicator.receive_json_from()
    assert (first["job"], first["state"]) == (job.pk, "running")
    assert [first["progress"]["done"], last["progress"]["done"]] == [40, 100]
    assert first["progress"]["sent_at"] <= last["progress"]["sent_at"]

    await Job.objects.filter(pk=job.pk).aupdate(state=Job.State.SUCCEEDED)
    await announce(job.pk)
    final = await communicator.receive_json_from()
    assert final == await api_view_of(job.pk, bob_cookie)
    assert final["state"] == "succeeded"
    await communicator.disconnect()


async def test_it_ignores_what_a_client_sends(memory_layer, job, bob_cookie):
    communicator = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                         headers=[ORIGIN, bob_cookie])
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()
    await communicator.send_json_to({"type": "job.state", "action": "cancel"})
    await communicator.send_to(text_data="not json at all")
    assert await communicator.receive_nothing(timeout=0.3)
    assert (await Job.objects.aget(pk=job.pk)).cancel_requested is False
    await communicator.disconnect()


async def test_the_dashboard_streams_every_job(memory_layer, job, bob_cookie):
    other = await Job.objects.acreate(kind="verify", host_id=job.host_id,
                                      state=Job.State.RUNNING)
    communicator = WebsocketCommunicator(application, "/ws/dashboard/",
                                         headers=[ORIGIN, bob_cookie])
    assert (await communicator.connect())[0]
    assert await communicator.receive_nothing(timeout=0.1)
    await report_progress(job.pk, event(1))
    await report_progress(other.pk, event(2))
    received = [await communicator.receive_json_from(), await communicator.receive_json_from()]
    assert [(message["job"], message["progress"]["done"]) for message in received] == [
        (job.pk, 1), (other.pk, 2)]
    await communicator.disconnect()


async def test_events_cross_the_real_redis_layer(settings, redis_url, job, bob_cookie):
    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [redis_url]}}}
    watcher = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                    headers=[ORIGIN, bob_cookie])
    dashboard = WebsocketCommunicator(application, "/ws/dashboard/", headers=[ORIGIN, bob_cookie])
    assert (await watcher.connect())[0] and (await dashboard.connect())[0]
    assert (await watcher.receive_json_from())["id"] == job.pk

    await report_progress(job.pk, event(55))
    for communicator in (watcher, dashboard):
        message = await communicator.receive_json_from(timeout=5)
        assert (message["job"], message["progress"]["done"]) == (job.pk, 55)
    await watcher.disconnect()
    await dashboard.disconnect()
