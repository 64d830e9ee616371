"""Servers on loopback that rclone reaches as a remote datastore: rclone's own WebDAV server,
and OpenSSH's sshd for SFTP with a throwaway host key and user key. Each yields (the folder
it serves, the `rclone:` remote of `store` inside it) and is stopped however the test ends."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from support.requirements import requirement_missing

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answering(port: int, server: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        assert time.monotonic() < deadline and server.poll() is None, f"no {what} server"
        time.sleep(0.1)


@contextlib.contextmanager
def _serving(argv: list[str], port: int, what: str, log: Path) -> Iterator[None]:
    with open(log, "wb") as output:
        server = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        _answering(port, server, what)
        yield
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def webdav_server(folder: Path) -> Iterator[tuple[Path, str]]:
    served = folder / "served"
    served.mkdir()
    port = free_port()
    # No directory cache: the tests change files behind the server's back.
    with _serving(["rclone", "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
                   "--dir-cache-time", "0s"], port, "WebDAV", folder / "webdav.log"):
        yield served, f"rclone::webdav,url='http://127.0.0.1:{port}':store"


@contextlib.contextmanager
def sftp_server(folder: Path) -> Iterator[tuple[Path, str]]:
    """sshd on loopback, logins by one user key only, the host key pinned in known_hosts."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        requirement_missing("sshd or ssh-keygen is missing: install openssh-server")
    if os.geteuid() != 0:
        requirement_missing("sshd needs root to serve logins")
    served = folder / "served"
    served.mkdir()
    port = free_port()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", folder / name],
                       check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    host_key = (folder / "host_key.pub").read_text().split()[:2]
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
AuthorizedKeysFile {folder / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
PidFile {folder / 'sshd.pid'}
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation folder
    with _serving([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], port, "SFTP",
                  folder / "sshd.log"):
        yield served, (f"rclone::sftp,host=127.0.0.1,port={port},user=root"
                       f",key_file={folder / 'user_key'},known_hosts_file={folder / 'known_hosts'}"
                       f":{served}/store")
