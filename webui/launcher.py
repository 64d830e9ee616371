"""The system's services as processes: each command line defined once, and how they are run.

Redis, the web server (uvicorn serving webui.asgi), a host's Celery worker and beat.
`manage.py up` (make run) supervises them all; `manage.py serve` supervises some (a
joined host's worker where no systemd runs) or becomes one (`--exec`: a systemd
unit, a container); the wiring tests and the web benchmark start them through the
same functions (webui.testing). Nothing here reads Django's settings: callers pass
what the settings say, so the tests can start services before Django is set up.

A supervised service that exits after it was ready is started again after a
back-off (1 s, doubling up to a minute, back to 1 s once it has run for a minute),
so a crashing worker costs its own jobs, never the dashboard.
"""
from __future__ import annotations

import ctypes
import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
REDIS, WEB, WORKER, BEAT = "redis", "web", "worker", "beat"
SERVICES = (REDIS, WEB, WORKER, BEAT)
BEAT_SCHEDULER = "webui.beat:Scheduler"
STOP_SECONDS = 15
BACK_OFF_FIRST_SECONDS = 1.0
BACK_OFF_LONGEST_SECONDS = 60.0
# A service that ran this long before it exited was healthy: its next restart waits the least.
HEALTHY_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


class ServiceFailed(Exception):
    """A service exited, or was not ready in time; the message holds its log's tail."""


# --- command lines -------------------------------------------------------------------

def redis_config(url: str, directory: Path, *, persistent: bool,
                 bind: Iterable[str] = ("127.0.0.1",)) -> str:
    """redis.conf for a Redis answering `url` (its port and password), keeping its files in
    `directory`; `persistent`: an append-only file, so queued jobs survive a restart.

    A file rather than arguments: a password on a command line is readable by every
    local user in /proc/<pid>/cmdline.
    """
    parts = urlsplit(url)
    lines = [f"bind {' '.join(bind)}", f"port {parts.port or 6379}", f"dir {directory}",
             'save ""', f"appendonly {'yes' if persistent else 'no'}"]
    if parts.password:
        lines.append(f"requirepass {parts.password}")
    return "\n".join(lines) + "\n"


def write_redis_config(url: str, directory: Path, *, persistent: bool,
                       bind: Iterable[str] = ("127.0.0.1",)) -> Path:
    """The config in `directory` (made private to this user), ready for redis_command()."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    config = directory / "redis.conf"
    partial = config.with_suffix(".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(redis_config(url, directory, persistent=persistent, bind=bind))
    os.replace(partial, config)
    return config


def redis_command(config: Path) -> list[str]:
    return ["redis-server", str(config)]


def web_command(*, bind: str, port: int, workers: int,
                trusted_proxies: Iterable[str] = ()) -> list[str]:
    """uvicorn serving the dashboard. Forwarded headers are believed from `trusted_proxies`
    only: uvicorn's default trusts 127.0.0.1, and any local user could then spoof a
    client's address."""
    proxies = list(trusted_proxies)
    forwarded = (["--proxy-headers", "--forwarded-allow-ips", ",".join(proxies)] if proxies
                 else ["--no-proxy-headers"])
    return [sys.executable, "-m", "uvicorn", "webui.asgi:application", "--host", bind,
            "--port", str(port), "--workers", str(workers), "--lifespan", "off", *forwarded]


def node_name(host_name: str) -> str:
    """The Celery node name of a host's worker: stable across restarts on one machine, which
    is how a restarted worker recognises the jobs its previous life left running."""
    return f"{host_name}@{socket.gethostname()}"


def host_queue(host_name: str) -> str:
    return f"host.{host_name}"


def worker_command(host_name: str, *, queues: Iterable[str] | None = None,
                   concurrency: int | None = None, quiet: bool = False) -> list[str]:
    """A host's Celery worker; `quiet`: no gossip or mingle with other workers (tests)."""
    command = [sys.executable, "-m", "celery", "-A", "webui", "worker",
               "--queues", ",".join(queues or [host_queue(host_name)]),
               "--hostname", node_name(host_name), "--loglevel", "INFO"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    if quiet:
        command += ["--without-mingle", "--without-gossip"]
    return command


def beat_command() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "webui", "beat", "--scheduler", BEAT_SCHEDULER,
            "--loglevel", "INFO"]


def worker_ready_line(host_name: str) -> str:
    return f"{node_name(host_name)} ready."


BEAT_READY_LINE = "beat: Starting..."


# --- probes --------------------------------------------------------------------------

def redis_problem(url: str) -> str | None:
    """None if the Redis at `url` answers a PING with the credentials the URL carries, else why
    not (in words that never show the password)."""
    import redis

    shown = shown_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except redis.AuthenticationError:
        return f"the Redis at {shown} refuses this password"
    except redis.ResponseError as error:
        return f"the Redis at {shown} refuses the connection ({error})"
    except redis.RedisError as error:
        return f"no Redis answers at {shown} ({error})"
    return None


def shown_url(url: str) -> str:
    """`url` with its password replaced by ***, fit for logs and pages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def http_answers(address: str, port: int, path: str = "/accounts/login/") -> bool:
    connection = http.client.HTTPConnection(address, port, timeout=2)
    try:
        connection.request("GET", path)
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


# --- processes -----------------------------------------------------------------------

def _terminate_with_parent() -> None:
    """Runs in a supervised child before exec: SIGTERM from the kernel when its supervisor dies,
    even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ServiceProcess:
    """A service as a subprocess leading its own process group, its output appended to a log.

    Stopping it signals the whole group, so no pool process or reloader outlives it.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path, *,
                 die_with_parent: bool = False):
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        self.started_at = time.monotonic()
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_terminate_with_parent if die_with_parent else None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """What it printed since it was started."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ready() until it is true; stop the process and raise ServiceFailed with the tail
        of its log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                self.stop()
                raise ServiceFailed(f"{self.name} exited {self.process.returncode} before {what}; "
                                    f"the last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceFailed(f"{self.name}: no sign of {what} after {timeout:.0f} s; "
                                    f"the last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """SIGTERM, then SIGKILL for whatever of its group is left after `timeout`; False if it
        had to be killed."""
        graceful = True
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                graceful = False
        self.kill_hard()
        return graceful

    def kill_hard(self) -> None:
        """SIGKILL to every process of the group, at once, as a power cut would."""
        self.signal_group(signal.SIGKILL)
        self.process.wait()


@dataclasses.dataclass
class ServiceSpec:
    """How to start one service and how to tell it is ready."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[ServiceProcess], bool]
    ready_seconds: float = 120.0


class Supervisor:
    """Starts services, waits until each is ready, restarts any that exits, stops them all.

    A service that exits before it was first ready fails the start (a wrong setting would
    only crash again); after that, an exit is logged through `say` and the service is
    started again after the back-off. Redis, when supervised, stops last.
    """

    def __init__(self, specs: list[ServiceSpec], say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic):
        self.specs = {spec.name: spec for spec in specs}
        self.say = say
        self.clock = clock
        self.running: dict[str, ServiceProcess] = {}
        self.restarts: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._restart_at: dict[str, float] = {}

    def start(self, names: Iterable[str] | None = None) -> None:
        """Starts the services named (all by default) that are not running yet."""
        for name in self.specs if names is None else names:
            if name not in self.running:
                self.running[name] = self._launch(self.specs[name])

    def wait_until_ready(self, stop_requested: Callable[[], bool]) -> None:
        """Until every running service is ready, or a stop was asked for."""
        waiting = dict(self.running)
        patience = max(self.specs[name].ready_seconds for name in waiting)
        deadline = self.clock() + patience
        while waiting:
            if stop_requested():
                return
            for name, service in list(waiting.items()):
                if self.specs[name].ready(service):
                    del waiting[name]
                elif not service.alive():
                    raise ServiceFailed(f"{name} exited with status {service.process.returncode}; "
                                        f"the last lines of {service.log_path}:\n"
                                        f"{service.log_tail(20)}")
            if self.clock() > deadline:
                raise ServiceFailed(f"not ready after {patience:.0f} s: "
                                    f"{', '.join(waiting)}\n" + "\n".join(
                                        f"--- {service.log_path}:\n{service.log_tail(20)}"
                                        for service in waiting.values()))
            time.sleep(0.2)

    def watch(self) -> None:
        """One look at every service: an exited one is scheduled for a restart, a due one
        started again. Call it every fraction of a second."""
        now = self.clock()
        for name, service in list(self.running.items()):
            if name in self._restart_at:
                if now >= self._restart_at[name]:
                    del self._restart_at[name]
                    self.running[name] = self._launch(self.specs[name])
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self.say(f"{name}: started again (restart {self.restarts[name]})")
                continue
            status = service.process.poll()
            if status is None:
                continue
            ran = now - service.started_at
            failures = 0 if ran >= HEALTHY_SECONDS else self._failures.get(name, 0) + 1
            self._failures[name] = failures
            delay = min(BACK_OFF_FIRST_SECONDS * 2 ** max(failures - 1, 0), BACK_OFF_LONGEST_SECONDS)
            self._restart_at[name] = now + delay
            self.say(f"{name} exited with status {status} after {ran:.0f} s; starting it again "
                     f"in {delay:.0f} s. The last lines of {service.log_path}:\n"
                     f"{service.log_tail(10)}")

    def stop(self) -> None:
        """SIGTERM to every service (Redis last: the others talk to it while they stop), then
        SIGKILL to what is left after the grace time."""
        clients = [service for name, service in self.running.items() if name != REDIS]
        broker = [service for name, service in self.running.items() if name == REDIS]
        for phase in (clients, broker):
            for service in phase:
                if service.alive():
                    service.signal_group(signal.SIGTERM)
            deadline = self.clock() + STOP_SECONDS
            for service in phase:
                try:
                    service.process.wait(max(0.0, deadline - self.clock()))
                except subprocess.TimeoutExpired:
                    self.say(f"{service.name} did not stop within {STOP_SECONDS} s: killing it")
                service.kill_hard()

    def kill(self) -> None:
        for service in self.running.values():
            service.signal_group(signal.SIGKILL)

    @staticmethod
    def _launch(spec: ServiceSpec) -> ServiceProcess:
        return ServiceProcess(spec.name, spec.command, spec.env, spec.log_path,
                              die_with_parent=True)
