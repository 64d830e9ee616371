"""Typed readers of the environment; settings.py is their only caller.

Each helper takes the default as a user would type it, and fails loudly with
ImproperlyConfigured naming the variable and its value, never a silent guess.
`NAME_FILE`, when set, is read instead of `NAME` for secrets (Docker secrets).
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Mapping, Optional

from django.core.exceptions import ImproperlyConfigured

# What .env.example's placeholders contain: a value holding it was never set.
PLACEHOLDER = "replace-me"

# A value an environment file can carry between single quotes, for systemd and sh alike.
QUOTABLE = re.compile(r"[^'\n\\]*")

# Every variable the settings read, in order: what a service manager must pass on.
READ_NAMES: dict[str, None] = {}

TRUE = {"true", "yes", "1", "on"}
FALSE = {"false", "no", "0", "off"}


def env_str(name: str, default: Optional[str] = None,
            environ: Mapping[str, str] = os.environ) -> Optional[str]:
    READ_NAMES[name] = None
    value = environ.get(name, "")
    return value if value != "" else default


def env_bool(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    value = env_str(name, None, environ)
    if value is None:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r}: use true or false")


def env_int(name: str, default: int, environ: Mapping[str, str] = os.environ,
            minimum: Optional[int] = None) -> int:
    value = env_str(name, None, environ)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: not a whole number") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={value!r}: must be at least {minimum}")
    return number


def env_float(name: str, default: float, environ: Mapping[str, str] = os.environ,
              minimum: Optional[float] = None) -> float:
    value = env_str(name, None, environ)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: not a number") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={value!r}: must be at least {minimum}")
    return number


def env_path(name: str, default: os.PathLike | str,
             environ: Mapping[str, str] = os.environ) -> Path:
    return Path(env_str(name, None, environ) or default).expanduser().absolute()


def env_list(name: str, default: str = "", environ: Mapping[str, str] = os.environ,
             separator: Optional[str] = None) -> list[str]:
    """Words separated by `separator` (None: any white space or commas)."""
    value = env_str(name, default, environ) or ""
    if separator is None:
        return [word for word in value.replace(",", " ").split() if word]
    return [word for word in value.split(separator) if word]


def env_networks(name: str, default: str = "", environ: Mapping[str, str] = os.environ
                 ) -> list[str]:
    """IP addresses and networks (10.0.0.0/8), separated by white space or commas, as given."""
    words = env_list(name, default, environ)
    for word in words:
        try:
            ipaddress.ip_network(word)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}={environ.get(name)!r}: {exc}") from None
    return words


def env_secret(name: str, default: Optional[str] = None,
               environ: Mapping[str, str] = os.environ) -> Optional[str]:
    path = env_str(f"{name}_FILE", None, environ)
    if path is None:
        return env_str(name, default, environ)
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"{name}_FILE={path!r}: {exc.strerror}") from None


def refuse_placeholder(name: str, value: Optional[str]) -> None:
    """A secret still holding .env.example's placeholder stops the process: it is public."""
    if value and PLACEHOLDER in value:
        raise ImproperlyConfigured(f"{name} is still the placeholder of .env.example: set it to a "
                                   "random value (python3 -c 'import secrets; "
                                   "print(secrets.token_urlsafe(32))')")


def private_directory(path: Path) -> Path:
    """`path`, made if missing, readable by its owner only (tightened if this process owns it)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
        if status.st_uid == os.geteuid() and stat.S_IMODE(status.st_mode) & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise ImproperlyConfigured(f"{str(path)!r}: cannot create it or make it private "
                                   f"({exc.strerror})") from None
    return path


def stored_secret(path: Path) -> str:
    """The random secret kept in `path`, made on first use, readable by its owner only.

    Processes starting at once (web, worker and beat sharing a volume) agree on
    one: the file is linked into place only if none is there yet.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ImproperlyConfigured(f"{str(path)!r}: {exc.strerror}") from None
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(48) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another process made it first: theirs counts
        return _read_secret(path)
    except OSError as exc:
        raise ImproperlyConfigured(f"{str(path)!r}: cannot make a secret there "
                                   f"({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def _read_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if not secret:
        raise ImproperlyConfigured(f"{str(path)!r} is empty: delete it to have a new secret made")
    return secret
