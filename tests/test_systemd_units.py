"""`make install-services`: the services as systemd units that systemd itself accepts, each
running the launcher's command line, restarted on failure, started at boot, with private files;
their environment file passes on the settings of the shell that installed them."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.requirements import requirement_missing

from webui.testing import REPO, RedisServer, free_port

SERVICES = ("redis", "web", "worker", "beat")


def install(tmp_path: Path, *arguments: str, **env) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("SECRET_KEY", "DATABASE_URL", "IMAGING_", "PYTEST_",
                                           "REDIS_URL", "DJANGO_"))}
    environment.update(DATA_DIR=str(tmp_path / "data"), **env)
    return subprocess.run([sys.executable, "manage.py", "install_units", *arguments], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=120)


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(path.read_text())
    return unit


@pytest.fixture
def installed(tmp_path):
    env_file = tmp_path / "imaging.env"
    env_file.write_text(f"DATA_DIR='{tmp_path / 'data'}'\n")
    done = install(tmp_path, *SERVICES, "--directory", str(tmp_path / "units"),
                   "--env-file", str(env_file), "--no-start")
    assert done.returncode == 0, done.stderr
    return tmp_path / "units", env_file, done.stdout


def test_systemd_accepts_every_unit(installed):
    if shutil.which("systemd-analyze") is None:
        requirement_missing("systemd-analyze is not installed (Debian's systemd package)")
    units, _, _ = installed
    paths = sorted(str(path) for path in units.glob("imaging-*.service"))
    assert [Path(path).name for path in paths] == sorted(f"imaging-{name}.service"
                                                         for name in SERVICES)
    checked = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                             text=True, timeout=60)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_each_unit_runs_the_launchers_service_restarted_at_boot_and_private(installed):
    units, env_file, output = installed
    for name in SERVICES:
        unit = read_unit(units / f"imaging-{name}.service")
        service = unit["Service"]
        assert service["ExecStart"] == (f"{sys.executable} {REPO / 'manage.py'} serve --exec "
                                        f"{name} --bind 0.0.0.0")
        assert (service["Restart"], service["UMask"], service["EnvironmentFile"]) == \
            ("on-failure", "0077", str(env_file))
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        if name != "redis":
            assert "imaging-redis.service" in unit["Unit"]["After"]
    # As make run does: the database is ready and the first admin's password shown once.
    assert "log in as admin, password " in output


def test_what_a_unit_runs_serves(tmp_path, installed):
    """The web unit's command, with the unit's environment: the dashboard answers."""
    redis_server = RedisServer(tmp_path / "redis", tmp_path / "redis.log")
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_server.url,
           "PORT": str(port)}
    units, _, _ = installed
    command = read_unit(units / "imaging-web.service")["Service"]["ExecStart"].split()
    command[command.index("0.0.0.0")] = "127.0.0.1"
    web = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from webui.launcher import http_answers
        for _ in range(600):
            if http_answers("127.0.0.1", port):
                break
            assert web.poll() is None, "the web unit's command exited"
            subprocess.run(["sleep", "0.1"])
        assert http_answers("127.0.0.1", port)
    finally:
        os.killpg(web.pid, 9)
        web.wait()
        redis_server.stop()


def test_the_default_environment_file_keeps_the_settings_of_the_installing_shell(tmp_path):
    """Without --env-file: what the settings read from this shell, with DATA_DIR absolute,
    in a file only root reads."""
    env_file = Path("/etc/imaging/imaging.env")
    if env_file.exists():
        pytest.skip(f"{env_file} belongs to this machine's installation")
    try:
        done = install(tmp_path, "worker", "--directory", str(tmp_path / "units"), "--no-start",
                       HOST_NAME="attic", WORKER_CONCURRENCY="2",
                       IMAGING_KEY_FILE="/root/vault.key")
        assert done.returncode == 0, done.stderr
        assert env_file.stat().st_mode & 0o777 == 0o600
        lines = env_file.read_text().splitlines()
        assert {"HOST_NAME='attic'", "WORKER_CONCURRENCY='2'", "IMAGING_KEY_FILE='/root/vault.key'",
                f"DATA_DIR='{tmp_path / 'data'}'"} <= set(lines)
        assert not [line for line in lines if line.startswith(("PATH=", "HOME="))]
    finally:
        shutil.rmtree(env_file.parent, ignore_errors=True)


def test_the_key_of_encrypted_datastores_reaches_the_worker_alone(tmp_path, monkeypatch):
    from webui.management.commands import serve
    monkeypatch.setenv("IMAGING_KEY_FILE", "/root/vault.key")
    monkeypatch.setenv("IMAGING_PASSPHRASE", "horse")
    services = {spec.name: spec.env for spec in serve.specs(list(SERVICES), "127.0.0.1", tmp_path)}
    assert services["worker"]["IMAGING_KEY_FILE"] == "/root/vault.key"
    assert services["worker"]["IMAGING_PASSPHRASE"] == "horse"
    for name in ("redis", "web", "beat"):
        assert "IMAGING_KEY_FILE" not in services[name] and "IMAGING_PASSPHRASE" not in services[name]
