"""Servers on loopback that rclone (and restic) reach as remotes: rclone's own WebDAV server,
and OpenSSH's sshd for SFTP with a throwaway host key and user key. Each serves a folder of
its own and is stopped however the block ends. The remote tests and the off-site copy lines
of the benchmark use them."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from webui.testing import free_port

SSHD = "/usr/sbin/sshd"
READY_SECONDS = 30


def sftp_problem() -> str | None:
    """Why this machine cannot serve SFTP here, or None."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        return "sshd or ssh-keygen is missing: install openssh-server"
    if os.geteuid() != 0:
        return "sshd needs root to serve logins"
    return None


def _answering(port: int, server: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"no {what} server on port {port}")
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
def webdav_server(folder: Path, *, read_only: bool = False,
                  login: tuple[str, str] | None = None) -> Iterator[tuple[Path, str]]:
    """(the folder served, the `rclone:` remote of `store` inside it); `read_only`: it
    refuses every change, as a remote reached with read-only credentials does; `login`:
    (user, password) it asks for, which the remote then carries."""
    served = folder / "served"
    served.mkdir(exist_ok=True)
    port = free_port()
    asked = ["--user", login[0], "--pass", login[1]] if login else []
    # No directory cache: the tests change files behind the server's back.
    with _serving(["rclone", "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
                   "--dir-cache-time", "0s", *(["--read-only"] if read_only else []), *asked],
                  port, "WebDAV", folder / "webdav.log"):
        credentials = ""
        if login:
            obscured = subprocess.run(["rclone", "obscure", "-"], input=login[1],
                                      capture_output=True, text=True, check=True).stdout.strip()
            credentials = f",user={login[0]},pass={obscured}"
        yield served, f"rclone::webdav,url='http://127.0.0.1:{port}'{credentials}:store"


@dataclasses.dataclass(frozen=True)
class SftpServer:
    served: Path  # the folder its remotes are in
    port: int
    user_key: Path
    known_hosts: Path

    def rclone_remote(self, name: str) -> str:
        """rclone's connection string for the folder `name` of `served` (without `rclone:`)."""
        return (f":sftp,host=127.0.0.1,port={self.port},user=root,key_file={self.user_key}"
                f",known_hosts_file={self.known_hosts}:{self.served / name}")

    def ssh_command(self) -> str:
        """The ssh command line that opens its sftp subsystem (restic's `sftp.command`)."""
        return (f"ssh -p {self.port} -i {self.user_key} -o UserKnownHostsFile={self.known_hosts}"
                " -o StrictHostKeyChecking=yes -o BatchMode=yes root@127.0.0.1 -s sftp")


@contextlib.contextmanager
def sftp_server(folder: Path) -> Iterator[SftpServer]:
    """sshd on loopback, logins by one user key only, the host key pinned in known_hosts."""
    problem = sftp_problem()
    if problem:
        raise RuntimeError(problem)
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
        yield SftpServer(served, port, folder / "user_key", folder / "known_hosts")
