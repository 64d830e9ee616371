"""API tokens and sessions are stored hashed: a copy of the database logs nobody in.

An attacker copies the database as any local user could read it (the SQLite file with its
WAL, or a dump of PostgreSQL), takes every string in it and tries each, and each piece of
the length of a token or a session key, as an API token and as a session cookie against the
live server: none logs in, while the real token, the one `drf_create_token` printed and the
real session still do, WebSockets included. A token and a session made before the upgrade,
when both were kept in the clear, still log in after the migration, and neither is left in
the database.
"""
from __future__ import annotations

import http.client
import importlib
import io
import re
import secrets
import shutil
import subprocess

import pytest
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore as PlaintextSessionStore
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from support.web import PASSWORD, logged_in, token_through_the_api
from websockets.sync.client import connect

from webui.testing import database_url

# What a secret of each kind is made of, and how long it is: an attacker tries every piece of
# the copy that could be one. Django's session keys; API tokens, hex (DRF's of 40, knox's of 64).
SESSION_KEYS = (rb"[0-9a-z]{32,}", (32,))
TOKENS = (rb"[0-9a-f]{40,}", (40, 64))
# The last migration before tokens and sessions were stored hashed.
BEFORE_HASHING = ("webui", "0007_host_access")
# Where DRF's authtoken kept tokens in the clear, and the migrations that made it.
DRF_TOKENS = "authtoken_token"
DRF_TOKEN_MIGRATIONS = ("0001_initial", "0002_auto_20160226_1747", "0003_tokenproxy",
                        "0004_alter_tokenproxy_options")


def database_copy(tmp_path) -> bytes:
    """The database's bytes as a local user copies them: SQLite's file and its WAL, or a dump."""
    settings = connection.settings_dict
    if settings["ENGINE"] == "django.db.backends.sqlite3":
        copied = b""
        for suffix in ("", "-wal"):
            copy = tmp_path / f"copy.sqlite3{suffix}"
            try:
                shutil.copyfile(settings["NAME"] + suffix, copy)
            except FileNotFoundError:
                continue
            copied += copy.read_bytes()
        return copied
    return subprocess.run(["pg_dump", "--dbname", database_url(settings)], check=True,
                          capture_output=True).stdout


def strings(copied: bytes) -> set[str]:
    return {run.decode() for run in re.findall(rb"[0-9A-Za-z_-]{8,}", copied)}


def pieces(copied: bytes, kind: tuple[bytes, tuple[int, ...]]) -> set[str]:
    """Every piece of the copy made and as long as a secret of that kind."""
    pattern, lengths = kind
    found = set()
    for run in re.findall(pattern, copied):
        text = run.decode()
        for length in lengths:
            found.update(text[start:start + length] for start in range(len(text) - length + 1))
    return found


class Server:
    """GET /api/disks/ on the live server with a token or a session cookie, over one connection."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def status(self, headers: dict[str, str]) -> int:
        self.connection.request("GET", "/api/disks/", headers={"Accept": "application/json",
                                                              **headers})
        response = self.connection.getresponse()
        response.read()
        return response.status

    def with_token(self, token: str) -> int:
        return self.status({"Authorization": f"Token {token}"})

    def with_session(self, session_key: str) -> int:
        return self.status({"Cookie": f"sessionid={session_key}"})


@pytest.fixture
def users():
    User.objects.create_user("alice", password=PASSWORD, is_staff=True)
    return User.objects.create_user("bob", password=PASSWORD)


def test_no_string_of_a_database_copy_logs_in(live_server_process, users, tmp_path):
    live = live_server_process
    token = token_through_the_api(live.url, "alice", PASSWORD)
    printed = io.StringIO()
    call_command("drf_create_token", "alice", stdout=printed)
    made_by_command = re.fullmatch(r"Generated token (\S+) for user alice\n", printed.getvalue())
    assert made_by_command, printed.getvalue()
    session_key = logged_in(live.url, "bob", PASSWORD).cookies["sessionid"]

    copied = database_copy(tmp_path)
    assert b"alice" in copied and b"bob" in copied, "the copy misses the users' rows"
    server = Server(live.port)
    try:
        assert server.with_token(token) == 200
        assert server.with_token(made_by_command[1]) == 200
        assert server.with_session(session_key) == 200
        found = strings(copied)
        let_in = [("token", secret) for secret in sorted(found | pieces(copied, TOKENS))
                  if server.with_token(secret) == 200]
        let_in += [("session", secret) for secret in sorted(found | pieces(copied, SESSION_KEYS))
                   if server.with_session(secret) == 200]
        assert let_in == [], f"{len(let_in)} strings of the copy logged in"
        assert server.with_token(token) == 200
        assert server.with_session(session_key) == 200
    finally:
        server.connection.close()
    with connect(f"ws://127.0.0.1:{live.port}/ws/dashboard/", origin=live.url, open_timeout=10,
                 additional_headers={"Cookie": f"sessionid={session_key}"}):
        pass  # accepted: the handshake raises when the server closes instead


@pytest.fixture
def drf_token_table():
    """authtoken_token, made by DRF's own migrations as before the upgrade; state of it."""
    state = MigrationExecutor(connection).loader.project_state()
    if DRF_TOKENS in connection.introspection.table_names():  # its app still installed
        yield state.apps.get_model("authtoken", "Token")
        return
    for name in DRF_TOKEN_MIGRATIONS:
        migration = importlib.import_module(f"rest_framework.authtoken.migrations.{name}")
        with connection.schema_editor() as editor:
            state = migration.Migration(name, "authtoken").apply(state, editor)
    model = state.apps.get_model("authtoken", "Token")
    yield model
    with connection.schema_editor() as editor:
        editor.delete_model(model)


@pytest.mark.django_db(transaction=True)
def test_a_token_and_a_session_of_before_the_upgrade_still_log_in_and_are_left_hashed(
        users, drf_token_table, tmp_path):
    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE_HASHING])
    token = drf_token_table.objects.create(key=secrets.token_hex(20), user_id=users.pk).key
    session = PlaintextSessionStore()
    session.update({SESSION_KEY: str(users.pk), HASH_SESSION_KEY: users.get_session_auth_hash(),
                    BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend"})
    session.create()

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert Client().get("/api/disks/", HTTP_AUTHORIZATION=f"Token {token}").status_code == 200
    browser = Client()
    browser.cookies["sessionid"] = session.session_key
    assert browser.get("/api/disks/").status_code == 200
    copied = database_copy(tmp_path)
    assert token.encode() not in copied, "the token is still in the database"
    assert session.session_key.encode() not in copied, "the session key is still in the database"
