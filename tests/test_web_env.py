"""The environment as settings read it: typed helpers that fail loudly, and a refused missing key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from webui.env import (env_bool, env_float, env_int, env_list, env_networks, env_path, env_secret,
                       env_str)

REPO = Path(__file__).resolve().parent.parent


def test_env_str_takes_an_empty_value_for_unset():
    assert env_str("NAME", "fallback", {}) == "fallback"
    assert env_str("NAME", "fallback", {"NAME": ""}) == "fallback"
    assert env_str("NAME", "fallback", {"NAME": "value"}) == "value"


@pytest.mark.parametrize("text", ["true", "True", "YES", "1", "on"])
def test_env_bool_reads_true_in_any_case(text):
    assert env_bool("DEBUG", False, {"DEBUG": text}) is True


@pytest.mark.parametrize("text", ["false", "False", "no", "0", "OFF"])
def test_env_bool_reads_false_in_any_case(text):
    assert env_bool("DEBUG", True, {"DEBUG": text}) is False


def test_env_bool_refuses_anything_else_naming_the_variable_and_value():
    with pytest.raises(ImproperlyConfigured, match=r"DEBUG='maybe'"):
        env_bool("DEBUG", False, {"DEBUG": "maybe"})
    assert env_bool("DEBUG", True, {}) is True


def test_env_int_and_float_refuse_words_and_values_below_the_minimum():
    assert env_int("PORT", 8000, {"PORT": "8080"}) == 8080
    with pytest.raises(ImproperlyConfigured, match="PORT='eighty'.*whole number"):
        env_int("PORT", 8000, {"PORT": "eighty"})
    with pytest.raises(ImproperlyConfigured, match="at least 1"):
        env_int("PORT", 8000, {"PORT": "0"}, minimum=1)
    assert env_float("JOB_LOST_SECONDS", 45.0, {"JOB_LOST_SECONDS": "2.5"}) == 2.5
    with pytest.raises(ImproperlyConfigured, match="JOB_LOST_SECONDS='soon'"):
        env_float("JOB_LOST_SECONDS", 45.0, {"JOB_LOST_SECONDS": "soon"})


def test_env_list_splits_on_white_space_commas_or_the_separator_given():
    assert env_list("ALLOWED_HOSTS", "", {"ALLOWED_HOSTS": "a.lan, b.lan  c.lan"}) == \
        ["a.lan", "b.lan", "c.lan"]
    assert env_list("IMAGING_DISK_FILES", "", {"IMAGING_DISK_FILES": "/a.img::/b,c.img"},
                    separator=":") == ["/a.img", "/b,c.img"]
    assert env_list("NOTIFY_URLS", "", {}) == []


def test_env_networks_takes_addresses_and_networks_and_names_a_bad_one():
    assert env_networks("TRUSTED_PROXIES", "", {"TRUSTED_PROXIES": "127.0.0.1, ::1 10.0.0.0/8"}) \
        == ["127.0.0.1", "::1", "10.0.0.0/8"]
    assert env_networks("TRUSTED_PROXIES", "", {}) == []
    for bad, reason in (("proxy.lan", "does not appear to be"), ("10.0.0.1/8", "host bits set"),
                        ("10.0.0.0/33", "does not appear to be")):
        with pytest.raises(ImproperlyConfigured, match=f"TRUSTED_PROXIES='{bad}'.*{reason}"):
            env_networks("TRUSTED_PROXIES", "", {"TRUSTED_PROXIES": bad})


def test_env_path_is_absolute_and_expands_the_home(tmp_path):
    assert env_path("DATA_DIR", "data", {}) == Path.cwd() / "data"
    assert env_path("DATA_DIR", "data", {"DATA_DIR": "~/state"}) == Path.home() / "state"


def test_env_secret_prefers_the_file_named_by_NAME_FILE(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("from-the-file\n")
    environ = {"SECRET_KEY": "from-the-variable", "SECRET_KEY_FILE": str(secret)}
    assert env_secret("SECRET_KEY", None, environ) == "from-the-file"
    assert env_secret("SECRET_KEY", None, {"SECRET_KEY": "from-the-variable"}) == "from-the-variable"
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY_FILE="):
        env_secret("SECRET_KEY", None, {"SECRET_KEY_FILE": str(tmp_path / "missing")})


def _load_settings(tmp_path, extra: str = "", **variables) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items()
           if name not in ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG", "REDIS_URL", "DATABASE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="webui.settings", DATA_DIR=str(tmp_path), **variables)
    return subprocess.run([sys.executable, "-c", "import django; django.setup(); "
                           "from django.conf import settings; print(settings.DEBUG); " + extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_without_a_key_settings_make_one_in_the_data_dir_that_every_process_reads(tmp_path):
    tmp_path.chmod(0o755)
    loads = [_load_settings(tmp_path, extra="print(settings.SECRET_KEY, settings.REDIS_URL)")
             for _ in range(2)]
    assert [load.returncode for load in loads] == [0, 0], loads[0].stderr
    assert loads[0].stdout == loads[1].stdout
    key = (tmp_path / "secret_key").read_text().strip()
    password = (tmp_path / "redis_password").read_text().strip()
    assert len(key) >= 50 and len(password) >= 50
    assert loads[0].stdout.split()[-2:] == [key, f"redis://:{password}@127.0.0.1:6380/0"]
    for path in (tmp_path / "secret_key", tmp_path / "redis_password"):
        assert path.stat().st_mode & 0o777 == 0o600
    # The state directory itself is the owner's alone, even if it was made open before.
    assert tmp_path.stat().st_mode & 0o777 == 0o700


def test_processes_starting_at_once_agree_on_one_key(tmp_path):
    starts = [subprocess.Popen([sys.executable, "-c", "from pathlib import Path; "
                                "from webui.env import stored_secret; "
                                f"print(stored_secret(Path({str(tmp_path / 'key')!r})))"],
                               cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(8)]
    keys = {start.communicate(timeout=60)[0].strip() for start in starts}
    assert keys == {(tmp_path / "key").read_text().strip()}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["key"]


def test_a_given_redis_url_is_used_as_it_is(tmp_path):
    load = _load_settings(tmp_path, REDIS_URL="redis://:given@nas.lan:6379/2",
                          extra="print(settings.REDIS_URL)")
    assert load.stdout.split()[-1] == "redis://:given@nas.lan:6379/2", load.stderr
    assert not (tmp_path / "redis_password").exists()


@pytest.mark.parametrize("name, value, said", [
    ("SECRET_KEY", "replace-me-with-something", "SECRET_KEY"),
    ("REDIS_URL", "redis://:replace-me-too@redis:6379/0", "the password in REDIS_URL"),
    ("DATABASE_URL", "postgres://imaging:replace-me@db:5432/imaging", "the password in DATABASE_URL"),
])
def test_settings_refuse_the_placeholders_of_env_example(tmp_path, name, value, said):
    result = _load_settings(tmp_path, **{name: value})
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {said} is still the placeholder of .env.example" in result.stderr


def test_settings_load_with_a_key_or_with_debug_on(tmp_path):
    with_key = _load_settings(tmp_path, SECRET_KEY="k" * 50)
    assert (with_key.returncode, with_key.stdout.strip()) == (0, "False"), with_key.stderr
    debug = _load_settings(tmp_path, DEBUG="true")
    assert (debug.returncode, debug.stdout.strip()) == (0, "True"), debug.stderr


def test_settings_refuse_a_boolean_they_cannot_read(tmp_path):
    result = _load_settings(tmp_path, SECRET_KEY="k" * 50, DEBUG="sometimes")
    assert result.returncode != 0
    assert "DEBUG='sometimes': use true or false" in result.stderr


def test_production_settings_pass_the_deployment_checklist(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if name not in ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG", "ALLOWED_HOSTS")}
    env.update(DJANGO_SETTINGS_MODULE="webui.settings", DATA_DIR=str(tmp_path), HTTPS="true",
               SECRET_KEY="x7Qm2-random-looking-production-key-vR9wLp4Zk8sT1nB6yH3cJ0fD5gA")
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level",
                             "WARNING"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_the_deployment_checklist_warns_of_plain_http(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if name not in ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG", "HTTPS")}
    env.update(DJANGO_SETTINGS_MODULE="webui.settings", DATA_DIR=str(tmp_path),
               SECRET_KEY="x7Qm2-random-looking-production-key-vR9wLp4Zk8sT1nB6yH3cJ0fD5gA")
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert "security.W004" in result.stdout + result.stderr  # no HSTS without HTTPS
