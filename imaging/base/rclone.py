"""Debian's rclone: the one way the engine reaches a remote datastore (docs/architecture.md,
"Sync" and "Remote datastores").

A remote is `rclone:` and anything rclone takes as a remote path: a configured
`name:path`, or a connection string such as `:webdav,url='http://h:8080':store`. What a
connection string holds secret never shows in a message (`shown`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from . import tools
from .errors import ImagingError, StoreError

PREFIX = "rclone:"
PACKAGE = "rclone"
# rclone's "directory not found" and "file not found" exit statuses.
NO_DIRECTORY = 3
NO_FILE = 4
# What a connection string may hold that nobody else should read: shown as ***.
SECRET_OPTION = re.compile(r"((?:^|,)[\w-]*(?:pass|key|token|secret|user|credential|grant|"
                           r"connection_string|header|auth|sas|account)[\w-]*=)"
                           r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[^,:]*)", re.IGNORECASE)
URL_USER = re.compile(r"(://)[^/@'\"]*@")
URL_QUERY = re.compile(r"(://[^?'\"\s]*\?)[^'\"\s,]*")
# A remote path with options: a name (or :type), then ,option=value ... and :path; an
# option alone means option=true. Names as rclone takes them, in ASCII.
CONNECTION_HEAD = re.compile(r"(:?[\w.+@ -]+)(?=,)", re.ASCII)
OPTION_NAME = re.compile(r"([\w-]+)(=?)", re.ASCII)
# What looks like a remote path with options, parsed or not: a comma before any : or /.
CARRIES_OPTIONS = re.compile(r"^:?[^:/]*,")
# The names given to connection strings made on the fly.
ALIAS = "imaging"
# How long a mount may take to appear: rclone reaches the remote first.
MOUNT_WAIT = 30.0
MOUNT_POLL = 0.05


def is_remote(place: object) -> bool:
    return str(place).startswith(PREFIX)


def remote_of(place: str) -> str:
    """What rclone takes, from `rclone:...`."""
    remote = place[len(PREFIX):]
    if not remote:
        raise StoreError("name the remote after rclone: (rclone:NAME:PATH)")
    if remote.startswith("-") or any(ord(char) < 32 for char in remote):
        # rclone would read a leading dash as one of its own options
        raise StoreError(f"{shown(place)} is no remote: it starts with - or holds a control "
                         "character")
    return remote


def shown(text: str) -> str:
    """`text` with what a remote's connection string holds secret (passwords, keys, tokens,
    users, a URL's user and password) as ***: for messages, results and registrations."""
    return URL_QUERY.sub(r"\1***", URL_USER.sub(r"\1***@", SECRET_OPTION.sub(r"\1***", text)))


def joined(remote: str, relative: str) -> str:
    """The remote path of `relative` below the remote folder `remote`."""
    return f"{remote}{relative}" if remote.endswith(":") else \
        f"{remote.rstrip('/')}/{relative}"


@dataclasses.dataclass
class _Hidden:
    """Command-line arguments with every connection string's options moved into rclone's
    configuration variables (RCLONE_CONFIG_NAME_OPTION): a process's arguments are readable
    by every local user, its environment by its owner only."""

    arguments: list[str]
    env: dict[str, str]
    named: dict[str, str]  # "imaging0:" -> the connection it stands for, as shown

    def told(self, text: str) -> str:
        """`text` (rclone's words) naming each remote as the user wrote it, secrets as ***."""
        for alias, connection in self.named.items():
            text = text.replace(alias, connection)
        return shown(text)


def _hidden(arguments: Sequence[str]) -> _Hidden:
    hidden = _Hidden([], {name: value for name, value in os.environ.items()
                          if not name.startswith(f"RCLONE_CONFIG_{ALIAS.upper()}")}, {})
    for argument in arguments:
        parsed = _connection(argument)
        if parsed is None:
            if CARRIES_OPTIONS.match(argument):
                # Never on a command line as it is: it may hold a secret.
                raise StoreError("a remote's options are not written as rclone takes them "
                                 "(NAME,OPTION=VALUE,...:PATH); not shown, as they may be secret")
            hidden.arguments.append(argument)
            continue
        name, options, path = parsed
        if name.startswith(":"):  # made on the fly: a name of its own, and its type
            alias = f"{ALIAS}{len(hidden.named)}"
            hidden.env[f"RCLONE_CONFIG_{alias.upper()}_TYPE"] = name[1:]
            hidden.named[f"{alias}:"] = shown(argument[:len(argument) - len(path)])
        else:  # a configured remote whose options the string overrides
            alias = name
        for option, value in options:
            hidden.env[f"RCLONE_CONFIG_{alias.upper()}_{option.upper().replace('-', '_')}"] = value
        hidden.arguments.append(f"{alias}:{path}")
    return hidden


def _connection(argument: str) -> Optional[tuple[str, list[tuple[str, str]], str]]:
    """(the remote's name or :type, [(option, value)], the path) of a remote path that
    carries options, in rclone's syntax (`:webdav,url='http://h:8080',pass=x:store`,
    quotes doubled inside quotes); None for anything else."""
    found = CONNECTION_HEAD.match(argument)
    if found is None:
        return None
    name, position, options = found.group(1), found.end(), []
    while position < len(argument) and argument[position] == ",":
        option = OPTION_NAME.match(argument, position + 1)
        if option is None:
            return None
        position = option.end()
        if not option.group(2):  # an option alone means option=true
            options.append((option.group(1), "true"))
            continue
        if position < len(argument) and argument[position] in "'\"":
            quote, value = argument[position], []
            position += 1
            while position < len(argument):
                if argument[position] == quote:
                    if argument[position + 1:position + 2] != quote:
                        break
                    position += 1
                value.append(argument[position])
                position += 1
            else:
                return None  # no closing quote
            position += 1
            text = "".join(value)
        else:
            end = len(argument)
            for stop in ",:":
                found_at = argument.find(stop, position)
                end = min(end, found_at) if found_at >= 0 else end
            text, position = argument[position:end], end
        options.append((option.group(1), text))
    if not options or position >= len(argument) or argument[position] != ":":
        return None
    return name, options, argument[position + 1:]


def run(command: str, *arguments: str, options: Sequence[str] = (),
        failure: Optional[str] = None, input: Optional[bytes] = None,
        cancelled: Optional[Callable[[], bool]] = None) -> subprocess.CompletedProcess:
    """`rclone COMMAND ARGUMENTS OPTIONS`, its output as text (unless `input` is given)."""
    hidden = _hidden([command, *arguments, *options])
    try:
        done = tools.run("rclone", PACKAGE, hidden.arguments, kind=StoreError, failure=failure,
                         input=input, text=input is None, cancelled=cancelled, env=hidden.env)
    except StoreError as exc:  # rclone quotes the remote
        raise StoreError(hidden.told(str(exc))) from None
    if isinstance(done.stderr, str):
        done.stderr = hidden.told(done.stderr)
    return done


@contextlib.contextmanager
def mounted(remote: str) -> Iterator[Path]:
    """The remote folder, mounted read-only by `rclone mount` in a private folder of this
    process's own (FUSE: no other user enters it) while the block runs."""
    folder = Path(tempfile.mkdtemp(prefix="imaging-remote-"))
    point = folder / "store"
    point.mkdir()
    errors = folder / "rclone.log"
    hidden = _hidden(["mount", remote, str(point), "--read-only", "--dir-cache-time", "5s"])
    with open(errors, "wb") as log:
        process = tools.started("rclone", PACKAGE, hidden.arguments, kind=StoreError,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, env=hidden.env)
    try:
        _wait_for_mount(point, process, errors, remote, hidden)
        try:
            yield point
        except ImagingError as exc:
            # Messages name the remote, not this private folder.
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].replace(str(point), shown(PREFIX + remote)),
                            *exc.args[1:])
            raise
    finally:
        if os.path.ismount(point):
            tools.run("fusermount3", "fuse3", ["-u", "-z", str(point)], kind=StoreError)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_mount(point: Path, process: subprocess.Popen, errors: Path, remote: str,
                    hidden: _Hidden) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while not os.path.ismount(point):
        if process.poll() is not None or time.monotonic() > deadline:
            problem = tools.last_line(errors.read_bytes()) or "it did not appear in time"
            raise StoreError(f"cannot mount {shown(PREFIX + remote)}: {hidden.told(problem)}")
        time.sleep(MOUNT_POLL)
