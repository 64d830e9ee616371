"""Typed readers of the environment; settings.py is their only caller.

Each helper takes the default as a user would type it, and fails loudly with
ImproperlyConfigured naming the variable and its value, never a silent guess.
`NAME_FILE`, when set, is read instead of `NAME` for secrets (Docker secrets).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Mapping, Optional

from django.core.exceptions import ImproperlyConfigured

TRUE = {"true", "yes", "1", "on"}
FALSE = {"false", "no", "0", "off"}


def env_str(name: str, default: Optional[str] = None,
            environ: Mapping[str, str] = os.environ) -> Optional[str]:
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
