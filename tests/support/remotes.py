"""Servers on loopback that rclone reaches as a remote datastore (bench/remotes.py): each
yields (the folder it serves, the `rclone:` remote of `store` inside it) and is stopped
however the test ends."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from support.requirements import requirement_missing

from bench import remotes

webdav_server = remotes.webdav_server


@contextlib.contextmanager
def sftp_server(folder: Path) -> Iterator[tuple[Path, str]]:
    problem = remotes.sftp_problem()
    if problem:
        requirement_missing(problem)
    with remotes.sftp_server(folder) as server:
        yield server.served, "rclone:" + server.rclone_remote("store")
