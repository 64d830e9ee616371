"""How many file sessions (a folder listed, a file or a folder downloaded) the web server
runs at once: a real uvicorn of two processes, a real backup of a real ext4 holding known
files, real HTTP clients.

Each session mounts the image through a private FUSE mount and runs the filesystem's
tools. Beyond FILE_SESSIONS_PER_USER for one user, or FILE_SESSIONS in all, a request
is answered 429 with Retry-After and a one-line message, never a 5xx; a download holds
its session until its last byte, and one abandoned half-way, or whose server process is
killed, frees it. The sessions' slots are read from the kernel's lock table, the
server's mounts from the mount table: counts and bytes, never timings.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import http.client
import io
import os
import random
import re
import signal
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.asgi import get_asgi_application
from django.test import Client
from engine import MiB
from support.devices import loop_device, mounted, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import image_mounts, own_image_mounts, unmount_own_image_mounts
from support.services import LiveServer

import imaging.backup
from webui import services
from webui.api.authentication import new_token
from webui.models import Image
from webui.services.filesessions import SLOTS_FOLDER

ALL_SESSIONS, PER_USER = 3, 2
# How many times each client of the storm asks.
ROUNDS = 3
# A hang is a failure, not a slow machine: far above any answer's time.
ANSWER_TIMEOUT = 120
EXT4_START, EXT4_SIZE = MiB, 96 * MiB
# Larger than every buffer between the server and a client that stops reading.
BIG_FILES, BIG_FILE_SIZE = 6, 8 * MiB


def known_files() -> dict[str, bytes]:
    rng = random.Random(7)
    files = {
        "hello.txt": b"hello from the image\n",
        "docs/report.bin": rng.randbytes(MiB + 7),
        "docs/notes.txt": "über alles\n".encode(),
    }
    for number in range(BIG_FILES):
        files[f"big/part-{number}.bin"] = rng.randbytes(64 * 1024) * (BIG_FILE_SIZE // (64 * 1024))
    return files


ROOT_NAMES = {"big/", "docs/", "hello.txt", "lost+found/"}
DOCS_NAMES = {"notes.txt", "report.bin"}


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    """A used-mode backup of a dos disk whose partition 1 is an ext4 holding known_files()."""
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("file-sessions")
    disk = folder / "lab.img"
    build_disk(disk, EXT4_START + EXT4_SIZE + MiB, "dos", [PartSpec(EXT4_SIZE, "empty")])
    with loop_device(disk, EXT4_START, EXT4_SIZE) as device:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            device)
        with mounted(device, folder / "mnt") as root:
            for name, data in known_files().items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
    imaging.backup.backup(str(disk), folder / "store", disk_id="lab", mode="used")
    disk.unlink()
    return folder / "store"


@dataclasses.dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage  # names in any case
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclasses.dataclass
class Lab:
    server: LiveServer
    image: Image
    ids: dict[str, int]  # user name: id
    cookies: dict[str, str]  # user name: session cookie
    token: str  # bob's API token
    slots: Path  # the server's slot folder
    server_tmp: Path  # where the server's private mounts and extracted copies go
    killed: set[int] = dataclasses.field(default_factory=set)  # server processes, on purpose

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=ANSWER_TIMEOUT)

    def request(self, user: str | None, url: str, **query) -> tuple[http.client.HTTPConnection,
                                                                    http.client.HTTPResponse]:
        connection = self.connection()
        headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={self.cookies[user]}"} if user else {}
        connection.request("GET", url + (f"?{urlencode(query)}" if query else ""),
                           headers=headers)
        return connection, connection.getresponse()

    def get(self, user: str | None, url: str, **query) -> Answer:
        connection, response = self.request(user, url, **query)
        with contextlib.closing(connection):
            return Answer(response.status, response.headers, response.read())

    def list(self, user: str | None, path: str = "") -> Answer:
        query = {"path": path} if path else {}
        return self.get(user, f"/images/{self.image.pk}/files/1/", **query)

    def download(self, user: str | None, path: str) -> Answer:
        return self.get(user, f"/images/{self.image.pk}/files/1/download/", path=path)

    def hosts(self) -> Answer:
        connection = self.connection()
        with contextlib.closing(connection):
            connection.request("GET", "/api/hosts/",
                               headers={"Authorization": f"Token {self.token}"})
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())

    def held(self) -> dict[str, int]:
        """The slot files of the server that a process holds locked: {name: that process}."""
        return held_slots(self.slots)

    def mounts(self) -> int:
        return sum(1 for mountpoint in image_mounts()
                   if Path(mountpoint).is_relative_to(self.server_tmp))

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, f"never {what}; slots held: {self.held()}"
            time.sleep(0.05)


def held_slots(folder: Path) -> dict[str, int]:
    """The files of `folder` an flock holds, from /proc/locks: {name: the holding process}."""
    if not folder.is_dir():
        return {}
    files = {}
    for path in folder.iterdir():
        found = path.stat()
        device = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}"
        files[f"{device}:{found.st_ino}"] = path.name
    held = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5] in files:  # a waiter's line reads "-> FLOCK"
            held[files[fields[5]]] = int(fields[4])
    return held


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def workers(server: LiveServer) -> set[int]:
    """The server's worker processes (its other child tracks multiprocessing's resources)."""
    found = set()
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            parent = int((process / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == server.pid and b"spawn_main" in (process / "cmdline").read_bytes():
                found.add(int(process.name))
    return found


def session_cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@pytest.fixture
def lab(live_environment, image_store, tmp_path) -> Lab:
    services.rescan(image_store)
    users = {"alice": User.objects.create_user("alice", is_staff=True),
             "carol": User.objects.create_user("carol", is_staff=True),
             "bob": User.objects.create_user("bob")}
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    env = dict(live_environment, TMPDIR=str(server_tmp), FILE_SESSIONS=str(ALL_SESSIONS),
               FILE_SESSIONS_PER_USER=str(PER_USER))
    server = LiveServer(env, tmp_path / "uvicorn.log", workers=2)
    try:
        lab = Lab(server, Image.objects.get(), {name: user.pk for name, user in users.items()},
                  {name: session_cookie(user) for name, user in users.items()},
                  new_token(users["bob"]),
                  Path(live_environment["DATA_DIR"]) / SLOTS_FOLDER, server_tmp)
        started = workers(server)
        assert len(started) == 2, started
        yield lab
        assert "Traceback" not in server.log(), server.log()[-3000:]
        # No other server process died: an abandoned download ends its session, not its process.
        assert {pid for pid in started - lab.killed if not alive(pid)} == set()
        # Downloads go out as they are made, not gathered whole first.
        assert "must consume synchronous iterators" not in server.log()
    finally:
        server.stop()
        assert unmount_own_image_mounts(tmp_path) == []


def listed_names(page: str) -> set[str]:
    return set(re.findall(r'<td data-label="Name">(?:<a href="[^"]*">)?([^<]*)', page))


def tar_files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return {member.name: archive.extractfile(member).read()
                for member in archive.getmembers() if member.isfile()}


def assert_refused(answer: Answer, page: bool) -> None:
    """429, a whole number of seconds to wait, one line that says why: on a page or plain."""
    assert answer.status == 429, (answer.status, answer.text[-500:])
    assert re.fullmatch(r"[1-9][0-9]*", answer.headers["Retry-After"]), answer.headers
    if page:
        assert answer.headers["Content-Type"].startswith("text/html")
        (line,) = re.findall(r'<p class="page-error" role="alert">([^<]*)</p>', answer.text)
        assert "at once" in line and "reload this page" in line.lower(), line
    else:
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert "\n" not in answer.text.strip() and "at once" in answer.text, answer.text


@contextlib.contextmanager
def paused_tar(lab: Lab, user: str):
    """A download of the big folder read only in part: the client stops reading, and the
    stream is abandoned (its connection closed) when the block ends."""
    connection, response = lab.request(user, f"/images/{lab.image.pk}/files/1/download/",
                                       path="big")
    try:
        assert response.status == 200, response.read()[:500]
        assert len(response.read(MiB)) == MiB
        yield response
    finally:
        # Closed with bytes unread, the socket is reset, as a browser's cancelled download is.
        response.close()
        connection.close()


def test_a_user_past_their_bound_and_anyone_past_the_servers_is_answered_429(lab):
    with paused_tar(lab, "alice"), paused_tar(lab, "alice"):
        assert len(lab.held()) == 4  # two slots of alice's, two of all
        for answer in (lab.download("alice", "hello.txt"), lab.download("alice", "big")):
            assert_refused(answer, page=False)
            assert f"{PER_USER} " in answer.text
        assert_refused(lab.list("alice"), page=True)
        # Another user still gets the session left.
        root = lab.list("bob")
        assert root.status == 200 and listed_names(root.text) == ROOT_NAMES

        with paused_tar(lab, "carol"):
            (carols_worker,) = {pid for name, pid in lab.held().items()
                                if name.startswith(f"user-{lab.ids['carol']}-")}
            listing = lab.list("bob", "docs")
            assert_refused(listing, page=True)
            assert f" {ALL_SESSIONS} " in listing.text
            assert_refused(lab.download("carol", "hello.txt"), page=False)
            # Anonymous requests never get as far as a session: the login page.
            anonymous = lab.list(None)
            assert anonymous.status == 302 and "/accounts/login/" in anonymous.headers["Location"]
            assert lab.download(None, "hello.txt").status == 302
            assert lab.hosts().status == 200

        # carol's abandoned stream frees its session: bob's listing is served again.
        lab.wait_for(lambda: len(lab.held()) == 4, "carol's session ended")
        assert alive(carols_worker)
        docs = lab.list("bob", "docs")
        assert docs.status == 200 and listed_names(docs.text) == DOCS_NAMES
    lab.wait_for(lambda: lab.held() == {}, "every abandoned session ended")
    assert lab.download("alice", "hello.txt").body == known_files()["hello.txt"]
    lab.wait_for(lambda: lab.mounts() == 0, "the last mount undone")


def test_a_storm_of_listings_and_downloads_never_mounts_past_the_bound(lab):
    """Clients that all ask at once, again as soon as answered: a viewer's listings, staff's
    listings and downloads, anonymous ones; and /api/hosts/ asked all along."""
    files = known_files()
    clients = ([("bob", "list", "")] * 36 + [("bob", "list", "docs")] * 12
               + [("alice", "list", "docs")] * 6 + [("alice", "download", "hello.txt")] * 8
               + [("alice", "download", "docs/report.bin")] * 6
               + [("alice", "download", "docs")] * 4 + [(None, "list", "")] * 4)
    running = threading.Event()
    running.set()
    most_mounts, hosts_answers = [0], []

    def watch_mounts():
        while running.is_set():
            most_mounts[0] = max(most_mounts[0], lab.mounts())
            time.sleep(0.005)

    def ask_hosts():
        while running.is_set():
            started = time.monotonic()
            hosts_answers.append((lab.hosts().status, time.monotonic() - started))
            time.sleep(0.05)

    start = threading.Barrier(len(clients))

    def client(user, kind, path):
        start.wait()
        return [((user, kind, path), getattr(lab, kind)(user, path)) for _ in range(ROUNDS)]

    watchers = [threading.Thread(target=watch_mounts), threading.Thread(target=ask_hosts)]
    for watcher in watchers:
        watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            answers = [answer for answers in pool.map(lambda args: client(*args), clients)
                       for answer in answers]
    finally:
        running.clear()
        for watcher in watchers:
            watcher.join()

    statuses = collections.Counter(answer.status for _, answer in answers)
    print(f"{statuses}; at most {most_mounts[0]} mounts; /api/hosts/ answered "
          f"{len(hosts_answers)} times, the slowest in {max(s for _, s in hosts_answers):.2f} s")
    assert set(statuses) <= {200, 302, 429}, statuses
    assert 0 < most_mounts[0] <= ALL_SESSIONS
    assert hosts_answers and {status for status, _ in hosts_answers} == {200}
    admitted = collections.Counter()
    for (user, kind, path), answer in answers:
        if user is None:
            assert answer.status == 302 and "/accounts/login/" in answer.headers["Location"]
            continue
        if answer.status == 429:
            assert_refused(answer, page=kind == "list")
            continue
        admitted[user] += 1
        if kind == "list":
            assert listed_names(answer.text) == (DOCS_NAMES if path else ROOT_NAMES)
        elif path == "docs":
            assert tar_files(answer.body) == {name: data for name, data in files.items()
                                              if name.startswith("docs/")}
        else:
            assert answer.body == files[path]
    assert admitted["bob"] and admitted["alice"] and statuses[429], (admitted, statuses)

    lab.wait_for(lambda: lab.held() == {} and lab.mounts() == 0, "every session ended")
    for user in ("bob", "alice"):
        assert listed_names(lab.list(user, "docs").text) == DOCS_NAMES
    assert tar_files(lab.download("alice", "big").body) == {
        name: data for name, data in files.items() if name.startswith("big/")}


def test_a_killed_server_process_frees_the_sessions_it_held(lab):
    with paused_tar(lab, "alice"):
        holders = set(lab.held().values())
        assert len(holders) == 1 and len(lab.held()) == 2
        (worker,) = holders
        os.kill(worker, signal.SIGKILL)
        lab.killed.add(worker)
        lab.wait_for(lambda: lab.held() == {}, "the killed process's sessions ended")
    # Both of alice's sessions are hers to use again, in whichever process answers.
    with paused_tar(lab, "alice"), paused_tar(lab, "alice"):
        assert_refused(lab.download("alice", "hello.txt"), page=False)
        assert lab.hosts().status == 200
    lab.wait_for(lambda: lab.held() == {}, "every abandoned session ended")
    assert lab.list("bob").status == 200


@pytest.mark.django_db(transaction=True)
def test_a_client_gone_while_its_download_is_extracted_leaves_no_session(image_store, settings,
                                                                         tmp_path):
    """Django's own ASGI handler, in this process: the client hangs up once the view holds
    its session, so the view's answer is dropped unsent and never closed. Its session ends
    with it, without waiting for Python's cycle collector."""
    settings.DATA_DIR = tmp_path
    settings.FILE_SESSIONS, settings.FILE_SESSIONS_PER_USER = ALL_SESSIONS, PER_USER
    services.rescan(image_store)
    image = Image.objects.get()
    cookie = session_cookie(User.objects.create_user("alice", is_staff=True))
    slots = tmp_path / SLOTS_FOLDER
    requested = []

    async def receive():
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        while not held_slots(slots):
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message):
        pass  # nothing gets this far: the client is gone while the view extracts

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": f"/images/{image.pk}/files/1/download/", "root_path": "",
             "query_string": b"path=big/part-0.bin", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1"),
                         (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode())]}
    gc.disable()
    try:
        asyncio.run(get_asgi_application()(scope, receive, send))  # returns once the view has
        assert held_slots(slots) == {}
    finally:
        gc.enable()
    assert own_image_mounts(tmp_path) == set()
