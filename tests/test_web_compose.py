"""docker-compose.yml with .env.example, as Debian's docker-compose reads them (no daemon needed)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.requirements import requirement_missing

REPO = Path(__file__).resolve().parent.parent
SERVICES = {"redis", "postgres", "web", "worker", "beat"}


def compose(*arguments: str, env_file: Path = REPO / ".env.example") -> subprocess.CompletedProcess:
    if shutil.which("docker-compose") is None:
        requirement_missing("docker-compose is not installed (make install)")
    # Only PATH: variables of the test run itself (SECRET_KEY...) would win over the env file.
    return subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "--env-file", str(env_file), *arguments],
        cwd=REPO, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def env_example() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each volume of a service."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}


def test_compose_file_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_it_has_the_five_services(config):
    assert set(config["services"]) == SERVICES


def test_the_worker_consumes_its_hosts_queue_with_the_hosts_disks(config):
    worker = config["services"]["worker"]
    host = env_example()["HOST_NAME"]
    assert worker["environment"]["HOST_NAME"] == host
    command = worker["command"].split()
    assert command[:4] == ["celery", "-A", "webui", "worker"]
    assert command[command.index("--queues") + 1] == f"host.{host}"
    assert worker["privileged"] is True
    assert mounts(worker)["/dev"] == "/dev"
    assert "/run/udev:/run/udev:ro" in worker["volumes"]


def test_web_worker_and_beat_share_the_database_and_redis(config):
    services = config["services"]
    environments = [services[name]["environment"] for name in ("web", "worker", "beat")]
    password = env_example()["POSTGRES_PASSWORD"]
    for environment in environments:
        assert environment["DATABASE_URL"] == f"postgres://imaging:{password}@postgres:5432/imaging"
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["SECRET_KEY"] == env_example()["SECRET_KEY"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password


def test_the_datastore_is_mounted_at_the_same_path_in_web_and_worker(config):
    datastore = env_example()["IMAGING_DATASTORE"]
    for name in ("web", "worker"):
        service = config["services"][name]
        assert service["environment"]["IMAGING_DATASTORE"] == datastore
        assert mounts(service)[datastore] == datastore


def test_beat_uses_the_database_scheduler(config):
    command = config["services"]["beat"]["command"].split()
    assert command[:4] == ["celery", "-A", "webui", "beat"]
    assert "django_celery_beat.schedulers:DatabaseScheduler" in command


def test_services_others_wait_for_have_healthchecks(config):
    services = config["services"]
    for name in ("redis", "postgres", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["web"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["web"]["condition"] == "service_healthy"


def test_a_missing_secret_is_refused(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env_example().items()
                                if name != "SECRET_KEY"))
    result = compose("config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert "set SECRET_KEY in .env" in result.stderr



def test_the_web_server_believes_forwarded_headers_from_trusted_proxies_only(config):
    """uvicorn is given TRUSTED_PROXIES, comma-separated; empty, it trusts no one."""
    web = config["services"]["web"]
    assert web["environment"]["TRUSTED_PROXIES"] == env_example()["TRUSTED_PROXIES"] == ""
    shell, flag, script = shlex.split(web["command"].replace("$$", "$"))
    assert (shell, flag) == ("sh", "-c")
    # The container's shell runs it; uvicorn's arguments are printed instead of run.
    script = script.replace("python manage.py", "true").replace("exec uvicorn", "printf '%s\\n'")
    for value, allowed in (("", ""), ("10.0.0.1 172.16.0.0/12", "10.0.0.1,172.16.0.0/12")):
        run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ["PATH"], "TRUSTED_PROXIES": value})
        assert f"--forwarded-allow-ips={allowed}" in run.stdout.splitlines(), run
