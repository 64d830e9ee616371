"""Other hosts: a one-line join command, each host's own access to Redis and the catalog, and
its revocation.

A staff user asks for a join command for a host name (`invite`). The command,
run as root on the new host, fetches a script (`join_script`, ops/join.sh), the
code and the wheels of what every host runs (`write_bundle`), then, once, the
host's settings (`claim`): at that moment the host gets a Redis user and a
PostgreSQL role of its own, with fresh random passwords that only the host
keeps. Neither the join token nor the passwords are stored: the token's
SHA-256 is, and the SHA-256 Redis itself keeps of the password, so that the
user can be given back after Redis restarts (`sync_access`, a sweep of beat's).
Revoking deletes the Redis user (Redis cuts its connections), takes the role's
login away and ends its sessions, and cancels the jobs queued for the host.

What a joined host may do: read and write the catalog's tables (not change
their shape) and use Redis for anything but administration. Join only machines
trusted like the dashboard's own: a host's worker runs as root and writes disks.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import re
import secrets
import tarfile
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.parse import quote, urlsplit

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from ..env import QUOTABLE
from ..models import HOST_NAME_RE, Host, HostAccess, Job
from .errors import Refused

log = logging.getLogger(__name__)

JOIN_VALID_FOR = dt.timedelta(hours=24)
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,100}")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", ""}
# Every key and channel; every command but administration (users, configuration,
# shutdown...) and wiping the data.
REDIS_COMMANDS = ["+@all", "-@admin", "-flushall", "-flushdb", "-swapdb"]
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
SEQUENCE_PRIVILEGES = "USAGE, SELECT, UPDATE"
JOIN_SCRIPT = settings.BASE_DIR / "ops" / "join.sh"
# What a worker needs of this repository, and the wheels `make install` builds.
BUNDLED = ("manage.py", "requirements.txt", "Makefile", "imaging", "webui", "templates",
           "static", "ops")
WHEELHOUSE = settings.BASE_DIR / ".venv" / "wheels"


@dataclasses.dataclass
class Invitation:
    host: Host
    token: str
    expires: dt.datetime
    datastore: str  # where the host must mount the datastore

    def command(self, server_url: str) -> str:
        return f"curl -sS {server_url}/join/{self.token}/ | sudo sh"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invite(host_name: str, user=None, now: Optional[dt.datetime] = None) -> Invitation:
    """A join command for `host_name`, valid JOIN_VALID_FOR, replacing any earlier unused one."""
    now = now or timezone.now()
    if not isinstance(host_name, str) or not re.fullmatch(HOST_NAME_RE, host_name):
        raise Refused(f"{host_name!r} is not a host name: use letters, digits and ._- only "
                      "(at most 63)")
    if host_name == settings.HOST_NAME:
        raise Refused(f"host {host_name} is this machine: its worker runs here already")
    _check_shared_catalog()
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        host, _ = Host.objects.get_or_create(name=host_name)
        access = HostAccess.objects.select_for_update().filter(host=host).first()
        if access is not None and access.state(now) == HostAccess.State.JOINED:
            raise Refused(f"host {host_name} has joined already: revoke its access first to "
                          "join it again")
        HostAccess.objects.update_or_create(host=host, defaults={
            "join_digest": digest(token), "join_expires": now + JOIN_VALID_FOR, "joined_at": None,
            "revoked_at": None, "redis_password_sha256": "", "created": now,
            "created_by": user if getattr(user, "is_authenticated", False) else None})
    return Invitation(host, token, now + JOIN_VALID_FOR, str(settings.IMAGING_DATASTORE))


def invitation(token: str, now: Optional[dt.datetime] = None) -> HostAccess:
    """The access a join token opens, or Refused saying why it opens nothing."""
    access = None
    if isinstance(token, str) and TOKEN_RE.fullmatch(token):
        access = HostAccess.objects.select_related("host").filter(join_digest=digest(token)).first()
    if access is None:
        raise Refused("this join command is unknown or was replaced: make a new one on the "
                      "dashboard's Hosts page")
    state = access.state(now)
    if state == HostAccess.State.EXPIRED:
        raise Refused(f"this join command for host {access.host.name} expired: make a new one "
                      "on the dashboard's Hosts page")
    if state != HostAccess.State.INVITED:
        raise Refused(f"this join command for host {access.host.name} was used already: make a "
                      "new one on the dashboard's Hosts page")
    return access


def join_script(access: HostAccess, server_url: str, token: str) -> str:
    header = "".join(f"{name}={_quoted(value)}\n" for name, value in
                     (("SERVER", server_url), ("TOKEN", token), ("HOST_NAME", access.host.name)))
    return f"#!/bin/sh\n{header}{JOIN_SCRIPT.read_text()}"


def refusal_script(reason: str) -> str:
    """What `curl ... | sh` runs when the join command opens nothing: the reason, exit 1."""
    return f"#!/bin/sh\necho {_quoted('join: ' + reason)} >&2\nexit 1\n"


def write_bundle(file: BinaryIO) -> None:
    """The code a worker runs and the wheels of its packages, as a tar archive."""
    root = settings.BASE_DIR
    with tarfile.open(fileobj=file, mode="w|") as tar:
        for name in BUNDLED:
            tar.add(root / name, arcname=name, filter=_without_caches)
        if WHEELHOUSE.is_dir():
            tar.add(WHEELHOUSE, arcname="wheels", filter=_without_caches)


def _without_caches(member: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
    if "__pycache__" in Path(member.name).parts or member.name.endswith(".pyc"):
        return None
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def claim(token: str, server_address: str, now: Optional[dt.datetime] = None) -> str:
    """Use the join command up: give its host a Redis user and a database role of its own, and
    return the host's settings (a file of NAME='value' lines)."""
    now = now or timezone.now()
    with transaction.atomic():
        # Under the row's lock: of two claims of one token, the second finds it used.
        access = HostAccess.objects.select_for_update().select_related("host").get(
            pk=invitation(token, now).pk)
        invitation(token, now)
        redis_password, database_password = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        _grant_database(access.database_role, database_password)
        _grant_redis(access.redis_user, digest(redis_password))
        # The token's hash stays, so that the command run again says it was used.
        access.joined_at, access.redis_password_sha256 = now, digest(redis_password)
        access.save(update_fields=["joined_at", "redis_password_sha256"])
    return _settings_file(access, server_address, redis_password, database_password, now)


def revoke(host: Host, now: Optional[dt.datetime] = None) -> HostAccess:
    """The host's Redis user and database role lose every access, at once; jobs queued for it
    are cancelled (a running one fails as worker lost, its worker cut off)."""
    now = now or timezone.now()
    with transaction.atomic():
        access = HostAccess.objects.select_for_update().filter(host=host).first()
        if access is None:
            raise Refused(f"host {host.name} never joined with a join command: nothing to revoke")
        if access.revoked_at is None:
            access.revoked_at = now
            access.save(update_fields=["revoked_at"])
        Job.objects.filter(host=host, state=Job.State.QUEUED).update(
            state=Job.State.CANCELLED, finished=now, cancel_requested=True,
            error=f"host {host.name}'s access was revoked")
        _end_database_role(access.database_role)
    _drop_redis_user(access.redis_user)
    return access


def sync_access() -> None:
    """Redis keeps users in memory only: after it restarts, joined hosts get theirs back (and a
    revoked host's user, should its deletion have failed, goes)."""
    accesses = list(HostAccess.objects.select_related("host").filter(joined_at__isnull=False))
    if not accesses:
        return
    client = _redis()
    try:
        for access in accesses:
            if access.revoked_at is None:
                client.acl_setuser(access.redis_user, enabled=True, reset=True,
                                   hashed_passwords=["+" + access.redis_password_sha256],
                                   **_redis_rules())
            else:
                client.acl_deluser(access.redis_user)
    finally:
        client.close()


# --- where a joined host finds things ------------------------------------------------

def server_url(request) -> str:
    """The dashboard's address for another host: as the browser reached it, unless that was
    this machine's loopback, which means nothing elsewhere; then by HOST_NAME."""
    reached = urlsplit(f"//{request.get_host()}")
    if (reached.hostname or "") in LOOPBACK_NAMES:
        return f"{request.scheme}://{settings.HOST_NAME}:{reached.port or request.get_port()}"
    return f"{request.scheme}://{request.get_host()}"


def _reachable(host: Optional[str], server_address: str) -> str:
    """A service's address as the joining host reaches it: the address it reached us by, when
    the service listens on this machine's loopback or socket."""
    return server_address if (host or "") in LOOPBACK_NAMES or (host or "").startswith("/") \
        else host


def _settings_file(access: HostAccess, server_address: str, redis_password: str,
                   database_password: str, now: dt.datetime) -> str:
    redis_url = urlsplit(settings.REDIS_URL)
    database = settings.DATABASES["default"]
    values = {
        "HOST_NAME": access.host.name,
        "DATABASE_URL": (f"postgres://{access.database_role}:{quote(database_password)}@"
                         f"{_host_part(_reachable(database.get('HOST'), server_address))}:"
                         f"{database.get('PORT') or 5432}/{quote(database['NAME'])}"),
        "REDIS_URL": (f"redis://{quote(access.redis_user)}:{quote(redis_password)}@"
                      f"{_host_part(_reachable(redis_url.hostname, server_address))}:"
                      f"{redis_url.port or 6379}{redis_url.path or '/0'}"),
        "IMAGING_DATASTORE": str(settings.IMAGING_DATASTORE),
        "TIME_ZONE": settings.TIME_ZONE,
        "NOTIFY_URLS": " ".join(settings.NOTIFY_URLS),
    }
    lines = [f"# Host {access.host.name}'s worker, joined {now.isoformat(timespec='seconds')}: "
             "readable by root only."]
    for name, value in values.items():
        if not QUOTABLE.fullmatch(value):
            raise Refused(f"{name} holds a quote, backslash or line break, which a settings "
                          "file cannot carry")
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + "\n"


def _host_part(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# --- Redis users and database roles --------------------------------------------------

def _check_shared_catalog() -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine != "django.db.backends.postgresql":
        raise Refused("other hosts share the catalog on PostgreSQL, and this one is an SQLite "
                      "file: set DATABASE_URL to a PostgreSQL database first (README: "
                      "“A second host”)")


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=5)


def _redis_rules() -> dict:
    return {"keys": ["*"], "channels": ["*"], "commands": REDIS_COMMANDS}


def _grant_redis(user: str, password_sha256: str) -> None:
    client = _redis()
    try:
        client.acl_setuser(user, enabled=True, reset=True,
                           hashed_passwords=["+" + password_sha256], **_redis_rules())
    except redis.ResponseError as error:
        raise Refused(f"the Redis of REDIS_URL does not let this dashboard add a user for the "
                      f"host ({error}): connect it as Redis' administrator") from None
    except redis.RedisError as error:
        raise Refused(f"Redis does not answer ({error}): try again once it does") from None
    finally:
        client.close()


def _drop_redis_user(user: str) -> None:
    client = _redis()
    try:
        # Deleting a user closes its connections too.
        client.acl_deluser(user)
    except redis.RedisError as error:
        # beat's sweep deletes it as soon as Redis answers.
        log.warning("Redis user %s not deleted yet: %s", user, error)
    finally:
        client.close()


def _grant_database(role: str, password: str) -> None:
    from psycopg import sql

    connection.ensure_connection()
    # Hashed here: the password itself never reaches the server, nor its statement log.
    verifier = connection.connection.pgconn.encrypt_password(
        password.encode(), role.encode(), b"scram-sha-256").decode()
    name = sql.Identifier(role)
    database = sql.Identifier(settings.DATABASES["default"]["NAME"])
    owner = sql.Identifier(settings.DATABASES["default"]["USER"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
            verb = "ALTER" if cursor.fetchone() else "CREATE"
            cursor.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                name, sql.Literal(verifier)).as_string(connection.connection))
            for statement in (
                    "GRANT CONNECT ON DATABASE {database} TO {name}",
                    "GRANT USAGE ON SCHEMA public TO {name}",
                    f"GRANT {TABLE_PRIVILEGES} ON ALL TABLES IN SCHEMA public TO {{name}}",
                    f"GRANT {SEQUENCE_PRIVILEGES} ON ALL SEQUENCES IN SCHEMA public TO {{name}}",
                    # Tables later migrations make.
                    f"ALTER DEFAULT PRIVILEGES FOR ROLE {{owner}} IN SCHEMA public "
                    f"GRANT {TABLE_PRIVILEGES} ON TABLES TO {{name}}",
                    f"ALTER DEFAULT PRIVILEGES FOR ROLE {{owner}} IN SCHEMA public "
                    f"GRANT {SEQUENCE_PRIVILEGES} ON SEQUENCES TO {{name}}",
                    # To end its sessions when it is revoked.
                    "GRANT {name} TO {owner}"):
                cursor.execute(sql.SQL(statement).format(name=name, database=database,
                                                         owner=owner).as_string(
                    connection.connection))
    except Exception as error:
        if "permission denied" in str(error).lower() or "must have" in str(error).lower():
            raise Refused(f"the catalog's database role may not create a role for the host "
                          f"({str(error).splitlines()[0]}): ALTER ROLE "
                          f"{settings.DATABASES['default']['USER']} CREATEROLE") from None
        raise


def _end_database_role(role: str) -> None:
    from psycopg import sql

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if cursor.fetchone() is None:
            return
        cursor.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(
            sql.Identifier(role)).as_string(connection.connection))
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = %s", [role])

