"""The live-service fixtures themselves: a real Redis, a real ASGI server and a
real worker that start, share the test's database, and leave no process behind."""

import http.client
import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid

import redis
from django.contrib.auth import get_user_model
from support.services import REPO, LiveServer


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_redis_url_answers_and_keeps_what_is_written(redis_url):
    client = redis.Redis.from_url(redis_url)
    key = f"imaging-test:{uuid.uuid4()}"
    try:
        client.set(key, b"\x00written\xff", ex=60)
        assert client.get(key) == b"\x00written\xff"
    finally:
        client.delete(key)
        client.close()


def test_live_server_logs_in_a_user_the_test_wrote(live_server_process):
    get_user_model().objects.create_user("carol", password="a-long-test-password", is_staff=True)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    login_url = f"{live_server_process.url}/admin/login/?next=/admin/"
    page = browser.open(login_url, timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": "carol", "password": "a-long-test-password",
                                   "csrfmiddlewaretoken": token, "next": "/admin/"}).encode()
    response = browser.open(urllib.request.Request(login_url, data=form), timeout=10)
    assert urllib.parse.urlsplit(response.url).path == "/admin/"
    assert "carol" in response.read().decode()


def test_live_server_refuses_an_anonymous_api_call(live_server_process):
    connection = http.client.HTTPConnection("127.0.0.1", live_server_process.port, timeout=10)
    connection.request("GET", "/api/hosts/")
    assert connection.getresponse().status in (401, 403)
    connection.close()


def test_live_server_leaves_no_process_at_teardown(live_environment, tmp_path):
    server = LiveServer(live_environment, tmp_path / "uvicorn.log")
    server.stop()
    assert not group_alive(server.pid)


def test_celery_worker_answers_a_ping_and_killed_hard_leaves_nothing(celery_worker):
    worker = celery_worker("selftest")
    ping = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "webui", "inspect", "ping",
         "--destination", worker.node_name, "--timeout", "10"],
        env=worker.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert f"{worker.node_name}: OK" in ping.stdout

    worker.kill_hard()
    assert worker.process.returncode == -signal.SIGKILL
    assert not group_alive(worker.pid)
