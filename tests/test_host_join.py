"""A second host joins with one line, backs up and restores its own disks, and is cut off when
its access is revoked.

The first host is `make run` on a PostgreSQL cluster of the test's own (listening on loopback
and on a veth link, as a NAS's listens on its LAN); the second host is a network namespace of
the test's own with its own address, reaching the first only over that link. A staff user
makes the join command on the Hosts page; it runs in the namespace as root, installs the
worker from what the first host serves (its code and wheels: no internet) into a folder of
the test's, and starts it (no systemd here: in the background, supervised).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
import redis
from support.launch import ApiClient, descendants, log_in
from support.launch import launch  # noqa: F401 (a fixture)
from support.requirements import requirement_missing

from webui.testing import free_port

MiB = 1024 * 1024
POSTGRES_BIN = Path("/usr/lib/postgresql")
JOIN_SECONDS = 300


def postgres_tool(name: str) -> Path:
    versions = sorted(POSTGRES_BIN.glob(f"*/bin/{name}"), key=lambda path: int(path.parts[-3]))
    if not versions:
        requirement_missing(f"PostgreSQL's {name} is not installed (make install)")
    return versions[-1]


def run(*command, **options) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          timeout=options.pop("timeout", 120), **options)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done


@pytest.fixture
def link():
    """A network namespace (the second host) and a veth link to it: (namespace, our address,
    its address)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        requirement_missing("network namespaces need root and iproute2")
    tag = secrets.token_hex(3)
    namespace, ours, theirs = f"join-{tag}", f"vn{tag}", f"vh{tag}"
    subnet = 10 + secrets.randbelow(200)
    nas, host = f"10.{subnet}.77.1", f"10.{subnet}.77.2"
    run("ip", "netns", "add", namespace)
    try:
        run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs)
        run("ip", "link", "set", theirs, "netns", namespace)
        run("ip", "addr", "add", f"{nas}/24", "dev", ours)
        run("ip", "link", "set", ours, "up")
        for command in (["addr", "add", f"{host}/24", "dev", theirs], ["link", "set", theirs, "up"],
                        ["link", "set", "lo", "up"]):
            run("ip", "netns", "exec", namespace, "ip", *command)
        yield namespace, nas, host
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture
def postgres(link):
    """A cluster of the test's own, the dashboard's role allowed to make roles (to give each
    joined host its own); its URL."""
    _, nas, _ = link
    initdb, pg_ctl = postgres_tool("initdb"), postgres_tool("pg_ctl")
    # Outside the test's private folder: the server runs as postgres.
    home = Path(tempfile.mkdtemp(prefix="imaging-test-postgres-"))
    (home / "password").write_text("superuser-Pass-1\n")
    shutil.chown(home, "postgres")
    shutil.chown(home / "password", "postgres")
    port = free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    run(*as_postgres, initdb, "-D", home / "data", "-A", "scram-sha-256", "-U", "postgres",
        f"--pwfile={home / 'password'}")
    with open(home / "data" / "postgresql.conf", "a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1,{nas}'\nport = {port}\n"
                   f"unix_socket_directories = '{home}'\n")
    with open(home / "data" / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {nas.rsplit('.', 1)[0]}.0/24 scram-sha-256\n")
    run(*as_postgres, pg_ctl, "-D", home / "data", "-l", home / "log", "-w", "start")
    try:
        superuser = f"postgres://postgres:superuser-Pass-1@127.0.0.1:{port}/postgres"
        with psycopg.connect(superuser, autocommit=True) as connection:
            connection.execute("CREATE ROLE imaging LOGIN CREATEROLE PASSWORD 'catalog-Pass-2'")
            connection.execute("CREATE DATABASE imaging OWNER imaging")
        yield f"postgres://imaging:catalog-Pass-2@127.0.0.1:{port}/imaging"
    finally:
        subprocess.run([*as_postgres, str(pg_ctl), "-D", str(home / "data"), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def second_host(tmp_path, link):
    """Where the joined host keeps its things, and its two disk files; its worker is stopped
    at teardown."""
    root = tmp_path / "attic"
    disks = [tmp_path / "attic-system.img", tmp_path / "attic-spare.img"]
    disks[0].write_bytes(os.urandom(6 * MiB) + bytes(10 * MiB))
    disks[1].write_bytes(b"\xee" * (16 * MiB))
    yield root, disks
    pid_file = root / "var" / "worker.pid"
    if pid_file.exists():
        supervisor = int(pid_file.read_text())
        for pid in [supervisor, *descendants(supervisor)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def join_command_from_the_hosts_page(base_url: str, password: str, name: str) -> str:
    browser = log_in(base_url, "admin", password)
    page = browser.open(f"{base_url}/hosts/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"name": name, "csrfmiddlewaretoken": token}).encode()
    shown = browser.open(urllib.request.Request(f"{base_url}/hosts/join/", data=form),
                         timeout=10).read().decode()
    found = re.search(r"<pre class=\"command\" data-join-command><code>(curl -sS (\S+) \| sudo "
                      r"sh)</code></pre>", shown)
    assert found, shown
    return found.group(1)


def run_joined(namespace: str, command: str, root: Path, disks: list[Path]) -> subprocess.CompletedProcess:
    """The join command as root types it on the new host, its folders moved into the test's."""
    fetch = command.removesuffix(" | sudo sh")
    variables = (f"IMAGING_PREFIX={root / 'opt'} IMAGING_CONFIG_DIR={root / 'etc'} "
                 f"IMAGING_DATA_DIR={root / 'var'} "
                 f"IMAGING_DISK_FILES={':'.join(map(str, disks))}")
    return subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                           f"{fetch} | {variables} sh"], capture_output=True, text=True,
                          timeout=JOIN_SECONDS)


def test_a_host_joins_with_one_line_backs_up_restores_and_is_cut_off_when_revoked(
        launch, tmp_path, link, postgres, second_host):
    namespace, nas, host_address = link
    root, disks = second_host
    password = "admin-Pass-3x"
    first = launch(tmp_path / "nas", "--no-demo-disk", HOST_NAME="nas", DATABASE_URL=postgres,
                   ADMIN_PASSWORD=password, ALLOWED_HOSTS=f"127.0.0.1 {nas}")
    first.wait_until_up()
    base_url = first.url()
    port = urllib.parse.urlsplit(base_url).port
    api = ApiClient(base_url, first.api_token())

    command = join_command_from_the_hosts_page(f"http://{nas}:{port}", password, "attic")
    assert command.startswith(f"curl -sS http://{nas}:{port}/join/")
    joined = run_joined(namespace, command, root, disks)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert "join: host attic joined: its worker runs in the background" in joined.stderr
    settings_file = root / "etc" / "worker.env"
    assert settings_file.stat().st_mode & 0o777 == 0o600
    host_settings = dict(re.findall(r"^(\w+)='(.*)'$", settings_file.read_text(), re.MULTILINE))
    assert urllib.parse.urlsplit(host_settings["REDIS_URL"]).hostname == nas
    assert urllib.parse.urlsplit(host_settings["DATABASE_URL"]).username.startswith(
        "imaging_host_attic_")

    # The new host's own disks, backed up and restored by its own worker.
    system, spare = api.disk(disks[0], timeout=120), api.disk(disks[1])
    assert (system["host"], spare["host"]) == ("attic", "attic")
    backup = api.finished(api.start(f"/api/disks/{system['id']}/backup/", {"mode": "raw"}))
    assert (backup["state"], backup["error"]) == ("succeeded", "")
    assert backup["worker"].startswith("attic@")
    restore = api.finished(api.start(f"/api/images/{backup['image']}/restore/", {
        "target_disk": spare["id"], "confirm": spare["stable_id"]}))
    assert (restore["state"], restore["error"], restore["host"]) == ("succeeded", "", "attic")
    assert disks[1].read_bytes() == disks[0].read_bytes()

    # Used up: the same line again only says so.
    again = run_joined(namespace, command, root, disks)
    assert again.returncode == 1
    assert again.stderr.strip() == ("join: this join command for host attic was used already: "
                                    "make a new one on the dashboard's Hosts page")

    # Revoked on the Hosts page: neither Redis nor the catalog lets the host in any more.
    [host_id] = [host["id"] for host in api.get("/api/hosts/")["results"] if host["name"] == "attic"]
    browser = log_in(base_url, "admin", password)
    page = browser.open(f"{base_url}/hosts/", timeout=10).read().decode()
    assert 'data-access="joined"' in page
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    browser.open(urllib.request.Request(f"{base_url}/hosts/{host_id}/revoke/", data=urllib.parse
                                        .urlencode({"csrfmiddlewaretoken": csrf}).encode()),
                 timeout=10)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(host_settings["REDIS_URL"].replace(nas, "127.0.0.1")).ping()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host_settings["DATABASE_URL"].replace(nas, "127.0.0.1"))
    status, refused = api.call("POST", f"/api/disks/{system['id']}/backup/", {"mode": "raw"})
    assert (status, refused) == (400, {"detail": "host attic's access was revoked: it runs no "
                                                 "jobs until it joins again"})
