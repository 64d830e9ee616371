"""ProgressSender: what reaches the channel layer and the database, and when."""
import asyncio
import logging
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from imaging.base.progress import ProgressEvent
from support.services import free_port
from support.web import MEMORY_LAYER

from webui.payloads import JobSerializer
from webui.models import Host, Job
from webui.progress import ProgressSender, send_job_state

PROGRESS_KEYS = {"phase", "unit", "done", "total", "rate", "eta", "bad_bytes", "stored_bytes",
                 "new_bytes", "sent_at"}

pytestmark = pytest.mark.django_db


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def event(done, *, phase="backup", total=100 << 20, bad_bytes=0, finished=False):
    return ProgressEvent(phase=phase, done=done, total=total, rate=float(done), eta=1.0,
                         elapsed=1.0, bad_bytes=bad_bytes, stored_bytes=done // 2,
                         new_bytes=done // 4, finished=finished)


@pytest.fixture
def job():
    host = Host.objects.create(name="h1")
    return Job.objects.create(kind="backup", host=host, state=Job.State.RUNNING)


@pytest.fixture
def listen(settings):
    """listen(group) -> a function returning the messages that group got since."""
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    layer = get_channel_layer()

    def subscribe(group):
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.group_add)(group, channel)

        async def drain():
            messages = []
            while True:
                try:
                    messages.append(await asyncio.wait_for(layer.receive(channel), 0.05))
                except asyncio.TimeoutError:
                    return messages

        return async_to_sync(drain)

    return subscribe


@pytest.fixture
def clock():
    return FakeClock()


def sender_for(job, clock, send_seconds=0.25, save_seconds=5.0):
    return ProgressSender(job.pk, clock=clock, send_seconds=send_seconds,
                          save_seconds=save_seconds)


def sent_done(messages):
    return [message["data"]["progress"]["done"] for message in messages]


def test_it_sends_the_design_shape_to_the_job_and_the_dashboard(job, listen, clock):
    of_job, of_dashboard = listen(f"job.{job.pk}"), listen("dashboard")
    before = time.time()
    sender_for(job, clock)(event(4096))
    after = time.time()

    job_messages, dashboard_messages = of_job(), of_dashboard()
    assert job_messages == dashboard_messages and len(job_messages) == 1
    message = job_messages[0]
    assert message["type"] == "job.progress"
    assert set(message["data"]) == {"job", "state", "progress"}
    assert message["data"]["job"] == job.pk and message["data"]["state"] == "running"
    progress = message["data"]["progress"]
    assert set(progress) == PROGRESS_KEYS
    assert progress["done"] == 4096 and progress["stored_bytes"] == 2048
    assert progress["new_bytes"] == 1024 and progress["unit"] == "bytes"
    assert before <= progress["sent_at"] <= after


def test_it_drops_events_inside_the_interval_and_flushes_the_newest(job, listen, clock):
    messages = listen(f"job.{job.pk}")
    sender = sender_for(job, clock)
    for at, done in [(0.0, 1), (0.1, 2), (0.2, 3), (0.3, 4), (0.5, 5)]:
        clock.now = 1000.0 + at
        sender(event(done))
    assert sent_done(messages()) == [1, 4]
    sender.flush()
    assert sent_done(messages()) == [5]
    sender.flush()
    assert messages() == []


def test_the_finished_event_always_goes_out_at_once(job, listen, clock):
    messages = listen(f"job.{job.pk}")
    sender = sender_for(job, clock)
    sender(event(1))
    clock.now += 0.01
    sender(event(2, finished=True))
    assert sent_done(messages()) == [1, 2]
    assert Job.objects.get(pk=job.pk).progress["done"] == 2


def test_a_new_phase_and_new_read_errors_skip_the_throttle(job, listen, clock):
    messages = listen(f"job.{job.pk}")
    sender = sender_for(job, clock)
    sender(event(10, phase="restore"))
    clock.now += 0.01
    sender(event(20, phase="restore"))  # dropped
    clock.now += 0.01
    sender(event(0, phase="verify"))
    clock.now += 0.01
    sender(event(5, phase="verify", bad_bytes=512))
    clock.now += 0.01
    sender(event(6, phase="verify", bad_bytes=512))  # dropped
    assert sent_done(messages()) == [10, 0, 5]


def test_it_saves_the_snapshot_at_most_every_save_interval(job, listen, clock):
    sender = sender_for(job, clock)
    saved = lambda: Job.objects.get(pk=job.pk)  # noqa: E731

    sender(event(100))
    first = saved()
    assert first.progress["done"] == 100 and first.progress_moved_at is not None
    assert set(first.progress) == PROGRESS_KEYS

    for at, done in [(1.0, 200), (4.9, 300)]:
        clock.now = 1000.0 + at
        sender(event(done))
    assert saved().progress["done"] == 100

    clock.now = 1005.0
    sender(event(400))
    assert saved().progress["done"] == 400

    clock.now = 1006.0
    sender(event(500))
    sender.close()
    assert saved().progress["done"] == 500


def test_progress_moved_at_only_moves_when_done_does(job, listen, clock):
    sender = sender_for(job, clock, save_seconds=1.0)
    sender(event(100))
    moved = Job.objects.get(pk=job.pk).progress_moved_at
    clock.now += 2
    sender(event(100))
    unchanged = Job.objects.get(pk=job.pk)
    assert unchanged.progress_moved_at == moved
    assert unchanged.progress["sent_at"] > 0
    clock.now += 2
    sender(event(101))
    assert Job.objects.get(pk=job.pk).progress_moved_at > moved


def test_the_context_manager_sends_and_saves_the_last_event(job, listen, clock):
    messages = listen(f"job.{job.pk}")
    with sender_for(job, clock) as sender:
        sender(event(1))
        sender(event(2))
    assert sent_done(messages()) == [1, 2]
    assert Job.objects.get(pk=job.pk).progress["done"] == 2


def test_a_channel_layer_that_is_down_does_not_fail_the_job(job, settings, clock, caplog):
    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [f"redis://127.0.0.1:{free_port()}/0"]}}}
    sender = sender_for(job, clock)
    with caplog.at_level(logging.WARNING, logger="webui.progress"):
        for done in (1, 2, 3):
            clock.now += 1
            sender(event(done))
        sender(event(4, finished=True))
    assert Job.objects.get(pk=job.pk).progress["done"] == 4
    warnings = [record for record in caplog.records if record.name == "webui.progress"]
    assert len(warnings) == 1
    assert "not sent" in warnings[0].getMessage()


def test_send_job_state_sends_the_api_shape(job, listen):
    of_job, of_dashboard = listen(f"job.{job.pk}"), listen("dashboard")
    send_job_state(job)
    expected = {"type": "job.state", "data": JobSerializer(job).data}
    assert of_job() == [expected]
    assert of_dashboard() == [expected]
