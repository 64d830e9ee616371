"""Live progress, all real: a backup started through the API of the uvicorn server, run by a
Celery worker, its events through Redis to a WebSocket client (the websockets library)."""
import json
import os
import time

import pytest
import requests
from django.contrib.auth.models import User
from django.test import Client
from support.services import wait_for
from websockets.sync.client import connect

from webui.api.authentication import new_token
from webui.models import Disk, Job

GiB = 1024 ** 3
# Sparse: long enough to read for several progress events, and it takes no room.
DISK_SIZE = 1 * GiB
FINISHED = {state.value for state in Job.FINISHED_STATES}


@pytest.fixture
def alice():
    return User.objects.create_user("alice", password="live-password-1", is_staff=True)


def session_cookie(user) -> str:
    """A browser's session of the user: the session row is in the database the server reads."""
    client = Client()
    client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
    return f"sessionid={client.cookies['sessionid'].value}"


def test_a_websocket_client_sees_a_backup_progress_then_its_final_state(
        live_server_process, celery_worker, alice, tmp_path):
    disk_file = tmp_path / f"live-progress-{os.getpid()}.img"
    with open(disk_file, "wb") as sparse:
        sparse.truncate(DISK_SIZE)
    worker = celery_worker(f"live-{os.getpid()}", disk_files=[disk_file])
    disk = wait_for(lambda: Disk.objects.filter(path=str(disk_file), present=True).first(),
                    "the disk file in the worker's inventory", 30, worker)

    server = live_server_process
    started = requests.post(f"{server.url}/api/disks/{disk.pk}/backup/", json={"mode": "raw"},
                            headers={"Authorization": f"Token {new_token(alice)}"},
                            timeout=30)
    assert started.status_code == 202, started.text
    job_id = started.json()["job"]

    progress, arrived = [], []
    with connect(f"ws://127.0.0.1:{server.port}/ws/jobs/{job_id}/", origin=server.url,
                 additional_headers={"Cookie": session_cookie(alice)}, open_timeout=10) as socket:
        snapshot = json.loads(socket.recv(timeout=10))
        assert (snapshot["id"], snapshot["kind"]) == (job_id, "backup")
        while True:
            message = json.loads(socket.recv(timeout=60))
            if "progress" in message and "id" not in message:
                arrived.append(time.time())
                progress.append(message)
            elif message["state"] in FINISHED:
                final = message
                break

    assert final["state"] == "succeeded", (final, worker.log()[-3000:])
    assert final == requests.get(f"{server.url}/api/jobs/{job_id}/", timeout=30,
                                 headers={"Cookie": session_cookie(alice)}).json()
    assert final["worker"] == worker.node_name
    done = [message["progress"]["done"] for message in progress]
    assert len(set(done)) >= 3, done
    assert done[-1] == DISK_SIZE and progress[-1]["progress"]["total"] == DISK_SIZE
    assert {message["job"] for message in progress} == {job_id}
    delays = sorted(at - message["progress"]["sent_at"]
                    for at, message in zip(arrived, progress))
    assert 0 <= delays[0] and delays[-1] < 5, delays
    print(f"{len(progress)} progress events; delay median "
          f"{delays[len(delays) // 2] * 1000:.1f} ms, worst {delays[-1] * 1000:.1f} ms")
