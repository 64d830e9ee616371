"""docker-compose.yml with .env.example, as Debian's docker-compose reads them (no daemon needed),
and the settings the services would start with."""

import os
import shutil
import subprocess
import sys
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
    assert worker["environment"]["HOST_NAME"] == env_example()["HOST_NAME"]
    # The launcher's worker command line, which takes its queue from HOST_NAME.
    assert worker["command"] == "python manage.py serve --exec worker"
    assert worker["privileged"] is True
    assert mounts(worker)["/dev"] == "/dev"
    assert "/run/udev:/run/udev:ro" in worker["volumes"]


def test_web_worker_and_beat_share_the_database_redis_and_the_data_volume(config):
    services = config["services"]
    password = env_example()["POSTGRES_PASSWORD"]
    redis_password = env_example()["REDIS_PASSWORD"]
    for name in ("web", "worker", "beat"):
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"] == f"postgres://imaging:{password}@postgres:5432/imaging"
        assert environment["REDIS_URL"] == f"redis://:{redis_password}@redis:6379/0"
        # No key given: the first to start makes it in the volume they share.
        assert environment["SECRET_KEY"] == ""
        assert mounts(services[name])["/data"] == "data"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password


def test_redis_takes_its_password_from_a_file_not_its_command_line(config):
    redis = config["services"]["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == env_example()["REDIS_PASSWORD"]
    script = redis["command"][-1]
    assert "> /data/redis.conf" in script and "redis-server /data/redis.conf" in script
    assert "requirepass" not in script.split("redis-server", 1)[1]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][-1]


def test_the_web_service_can_mount_images_for_the_file_browser(config):
    web = config["services"]["web"]
    assert any(device.split(":")[0] == "/dev/fuse" for device in web["devices"])
    assert "SYS_ADMIN" in web["cap_add"]


def test_the_datastore_is_mounted_at_the_same_path_in_web_and_worker(config):
    datastore = env_example()["IMAGING_DATASTORE"]
    for name in ("web", "worker"):
        service = config["services"][name]
        assert service["environment"]["IMAGING_DATASTORE"] == datastore
        assert mounts(service)[datastore] == datastore


def test_web_and_beat_run_the_launchers_command_lines(config):
    assert config["services"]["beat"]["command"] == "python manage.py serve --exec beat"
    assert config["services"]["web"]["command"].endswith("&& exec python manage.py serve --exec web\"")


def test_services_others_wait_for_have_healthchecks(config):
    services = config["services"]
    for name in ("redis", "postgres", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["web"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["web"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["POSTGRES_PASSWORD", "REDIS_PASSWORD"])
def test_a_missing_password_is_refused(tmp_path, name):
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{variable}={value}\n" for variable, value in env_example().items()
                                if variable != name))
    result = compose("config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert f"set {name} in .env" in result.stderr


def _settings_load(environment: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "webui.settings",
           **{name: str(value) for name, value in environment.items()}, "DATA_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setting, placeholder", [
    ("SECRET_KEY", "SECRET_KEY"),
    ("POSTGRES_PASSWORD", "the password in DATABASE_URL"),
    ("REDIS_PASSWORD", "the password in REDIS_URL"),
])
def test_the_services_refuse_to_start_with_a_placeholder_left_in(tmp_path, setting, placeholder):
    """What .env.example holds is public: a service started with it stops, naming it."""
    values = {**env_example(), "POSTGRES_PASSWORD": "pg-Secret_1", "REDIS_PASSWORD": "redis-Secret_2",
              "SECRET_KEY": "", setting: "replace-me-please"}
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    result = compose("config", env_file=env_file)
    assert result.returncode == 0, result.stderr
    environment = yaml.safe_load(result.stdout)["services"]["web"]["environment"]
    loaded = _settings_load(environment, tmp_path)
    assert loaded.returncode != 0
    assert f"ImproperlyConfigured: {placeholder} is still the placeholder of .env.example" \
        in loaded.stderr


def test_the_services_start_with_real_passwords_and_make_the_key(tmp_path):
    values = {**env_example(), "POSTGRES_PASSWORD": "pg-Secret_1", "REDIS_PASSWORD": "redis-Secret_2"}
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    environment = yaml.safe_load(compose("config", env_file=env_file).stdout)["services"]["web"][
        "environment"]
    loaded = _settings_load(environment, tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_the_web_server_is_told_which_proxies_to_believe(config):
    """TRUSTED_PROXIES reaches the settings, from which the launcher gives uvicorn its flag."""
    web = config["services"]["web"]
    assert web["environment"]["TRUSTED_PROXIES"] == env_example()["TRUSTED_PROXIES"] == ""
