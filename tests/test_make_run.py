"""What `make run` runs (ops/run.sh, then manage.py up) on a fresh data directory:
every service comes up and answers, the admin's printed password logs in and is
stored nowhere, the demo disk is a disk of this host, everything it keeps is
private to root, `manage.py` typed by hand afterwards finds its settings, and
Ctrl-C, or even kill -9 of the launcher, leaves no process behind."""

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import redis
from support.launch import STOP_SECONDS, log_in, service_kinds
from support.launch import launch  # noqa: F401 (a fixture)

MiB = 1024 * 1024


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *command], capture_output=True,
                          text=True, timeout=30)


def test_first_run_serves_the_demo_disk_and_ctrl_c_stops_every_process(launch, tmp_path):
    data_dir = tmp_path / "data"
    launcher = launch(data_dir)
    launcher.wait_until_up()
    output = launcher.output()
    password = output.split("log in as admin, password ", 1)[1].split()[0]
    assert service_kinds(launcher.services) == {"redis", "web", "worker", "beat"}

    base_url = launcher.url()
    browser = log_in(base_url, "admin", password)
    demo_disk = data_dir / "demo" / "demo-disk.img"
    assert demo_disk.stat().st_size == 512 * MiB
    disks = json.loads(browser.open(f"{base_url}/api/disks/", timeout=10).read())["results"]
    assert [(disk["host"], disk["size"]) for disk in disks if disk["path"] == str(demo_disk)] \
        == [("maketest", 512 * MiB)]

    # Only Django's hash of the password is kept.
    for path in data_dir.rglob("*"):
        if path.is_file() and path != demo_disk:
            assert password.encode() not in path.read_bytes(), path

    os.killpg(launcher.process.pid, signal.SIGINT)
    assert launcher.process.wait(STOP_SECONDS) == 0
    assert launcher.output().rstrip().endswith("stopped.")
    assert launcher.wait_until_gone(launcher.services) == {}


def test_what_it_keeps_is_roots_alone_and_redis_wants_its_password(launch, tmp_path):
    data_dir = tmp_path / "data"
    tmp_path.chmod(0o755)  # so that only DATA_DIR's own modes stand in another user's way
    launcher = launch(data_dir, "--no-demo-disk", REDIS_URL=None)
    launcher.wait_until_up()
    open_paths = [f"{path} {oct(path.stat().st_mode & 0o777)}" for path in [data_dir, *data_dir.rglob("*")]
                  if path.stat().st_mode & 0o077]
    assert open_paths == []
    for kept in ("db.sqlite3", "db.sqlite3-wal", "secret_key", "redis_password", "logs/web.log",
                 "redis/redis.conf", "redis/appendonlydir"):
        assert (data_dir / kept).exists(), kept
    assert "Permission denied" in as_nobody("ls", str(data_dir)).stderr
    assert "Permission denied" in as_nobody("cat", str(data_dir / "db.sqlite3")).stderr

    # Redis, on its own port: nothing without the password, which is nowhere another user can
    # read it (not in a command line either).
    refused = as_nobody("redis-cli", "-p", "6380", "set", "webui:planted", "x")
    assert "NOAUTH" in refused.stdout + refused.stderr
    password = (data_dir / "redis_password").read_text().strip()
    for pid in launcher.services:
        assert password not in Path(f"/proc/{pid}/cmdline").read_text(), pid
    client = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:6380/0")
    assert client.get("webui:planted") is None
    client.close()


def test_manage_py_typed_by_hand_finds_what_make_run_made(launch, tmp_path):
    data_dir = tmp_path / "data"
    launcher = launch(data_dir, "--no-demo-disk", ADMIN_PASSWORD="first-Admin-pass-1")
    launcher.wait_until_up()
    # The README's commands, in a shell that sets nothing but DATA_DIR (./data by default).
    token = launcher.api_token("admin")
    request = urllib.request.Request(f"{launcher.url()}/api/hosts/",
                                     headers={"Authorization": f"Token {token}"})
    hosts = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert [host["name"] for host in hosts["results"]] == ["maketest"]
    changed = launcher.manage("changepassword", "admin",
                              input="second-Admin-pass-2\nsecond-Admin-pass-2\n")
    assert changed.returncode == 0, changed.stderr
    assert "Password changed successfully for user 'admin'" in changed.stdout
    log_in(launcher.url(), "admin", "second-Admin-pass-2")


def test_kill_9_of_the_launcher_leaves_no_service_running(launch, tmp_path):
    data_dir = tmp_path / "data"
    # An existing demo disk is used as it is.
    (data_dir / "demo").mkdir(parents=True)
    with open(data_dir / "demo" / "demo-disk.img", "wb") as disk:
        disk.truncate(64 * MiB)
    launcher = launch(data_dir, ADMIN_PASSWORD="a-chosen-admin-password")
    launcher.wait_until_up()
    assert "log in as admin with the password in ADMIN_PASSWORD" in launcher.output()
    assert "a-chosen-admin-password" not in launcher.output()
    log_in(launcher.url(), "admin", "a-chosen-admin-password")
    assert service_kinds(launcher.services) == {"redis", "web", "worker", "beat"}

    launcher.process.kill()
    launcher.process.wait()
    assert launcher.wait_until_gone(launcher.services) == {}
