"""What a viewer may not do and paths that lead nowhere cost the real server's log one line
each, never a traceback: a viewer's 403 on a page, a form or the API, a WebSocket to a path
no consumer serves (refused at the handshake, not a 500)."""
import re
import time

import pytest
import requests
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from webui.api.authentication import new_token
from webui.models import Datastore, Disk, Host, Image, Schedule

# uvicorn's access log: one line for every request, whatever its answer.
ACCESS_LINE = re.compile(r"^INFO: +(\S+ - \"|\('|connection )")


@pytest.fixture
def lab(transactional_db):
    host = Host.objects.create(name="h1", last_seen=timezone.now())
    disk = Disk.objects.create(host=host, stable_id="wwn-1", size=1 << 30, path="/dev/sdz")
    datastore = Datastore.objects.create(path="/srv/store")
    image = Image.objects.create(disk=disk, datastore=datastore, stamp="2026-12-01T00-00-00Z",
                                 path="/srv/store/images/wwn-1/2026-12-01T00-00-00Z",
                                 size=1 << 30, created=timezone.now())
    schedule = Schedule.objects.create(disk=disk, datastore=datastore)
    return {"disk": disk, "datastore": datastore, "image": image, "schedule": schedule}


@pytest.fixture
def viewer(transactional_db):
    bob = User.objects.create_user("bob", password="bob-password-1")
    client = Client()
    client.force_login(bob, backend="django.contrib.auth.backends.ModelBackend")
    return {"user": bob, "session": client.cookies["sessionid"].value}


def new_log_lines(server, since: int) -> list[str]:
    """What the server logged past offset `since`, but for its access log."""
    time.sleep(0.2)
    return [line for line in server.log()[since:].splitlines() if not ACCESS_LINE.match(line)]


def test_a_viewers_403s_log_one_line_each(private_redis, live_server_process, lab, viewer):
    server = live_server_process
    browser = requests.Session()
    browser.cookies.set("sessionid", viewer["session"])
    page = browser.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
    image, datastore = lab["image"].pk, lab["datastore"].pk
    token = {"Authorization": f"Token {new_token(viewer['user'])}"}
    refusals = [
        ("get", "/schedules/new/", {}), ("get", f"/schedules/{lab['schedule'].pk}/", {}),
        ("get", f"/images/{image}/restore/", {}),
        ("get", f"/images/{image}/restore-partition/", {}),
        ("get", f"/images/{image}/files/1/download/?path=/etc/passwd", {}),
        ("post", f"/datastores/{datastore}/gc/", {"X-CSRFToken": csrf}),
        ("post", f"/images/{image}/delete/", {"X-CSRFToken": csrf}),
        ("post", f"/api/disks/{lab['disk'].pk}/backup/", {"X-CSRFToken": csrf}),
        ("post", f"/api/disks/{lab['disk'].pk}/backup/", token),
    ]
    for method, path, headers in refusals:
        since = len(server.log())
        response = browser.request(method, f"{server.url}{path}", headers=headers, timeout=30)
        assert response.status_code == 403, (path, response.text[:300])
        logged = new_log_lines(server, since)
        assert len(logged) <= 1, (path, logged)
        assert not any("Traceback" in line for line in logged), (path, logged)
    assert Image.objects.filter(pk=image).exists()
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_websocket_to_no_consumer_is_refused_at_the_handshake(
        private_redis, live_server_process, viewer):
    server = live_server_process
    cookie = {"Cookie": f"sessionid={viewer['session']}"}
    paths = ["/ws/nothing/", "/ws/", "/ws/jobs/", "/ws/jobs/abc/", f"/ws/jobs/{10 ** 30}/",
             f"/ws/jobs/{2 ** 63}/", "/ws/dashboard/extra/", "/elsewhere/"]
    for path in paths:
        since = len(server.log())
        with pytest.raises(InvalidStatus) as refused:
            with connect(f"ws://127.0.0.1:{server.port}{path}", origin=server.url,
                         additional_headers=cookie, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403, (path, refused.value.response)
        logged = new_log_lines(server, since)
        assert len(logged) <= 1, (path, logged)
    assert server.alive()
    log = server.log()
    assert "Traceback" not in log and " 500" not in log and "ERROR" not in log, log[-3000:]
