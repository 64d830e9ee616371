"""The WebSocket handshake's Origin check, the one Django's CSRF protection makes of a form's.

A browser sends the session cookie with a WebSocket opened by any page, so the
Origin must be the server's own, as the request names it: its scheme (ws as
http, wss as https), its Host header, which must be one of ALLOWED_HOSTS, and so
its port too (a page served on another port of the same machine is another
origin); or one of CSRF_TRUSTED_ORIGINS, `https://*.example.org` standing for
that domain's subdomains. Without an Origin a handshake is refused.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain


class SameOriginValidator:
    """Passes a WebSocket on to `application` if its Origin is allowed, else closes it
    before it is accepted (the server answers the handshake 403)."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


def origin_allowed(scope) -> bool:
    origin, host = _single_header(scope, b"origin"), _single_header(scope, b"host")
    if origin is None:
        return False
    if host is not None:
        domain, _ = split_domain_port(host)
        scheme = "https" if scope.get("scheme") == "wss" else "http"
        if domain and validate_host(domain, settings.ALLOWED_HOSTS) and \
                origin == f"{scheme}://{host}":
            return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in (entry for entry in trusted if "*" not in entry):
        return True
    try:
        wanted = urlsplit(origin)
    except ValueError:
        return False
    return any(wanted.scheme == allowed.scheme
               and is_same_domain(wanted.netloc, allowed.netloc.lstrip("*"))
               for allowed in (urlsplit(entry) for entry in trusted if "*" in entry))


def _single_header(scope, name: bytes) -> str | None:
    """The header's value; None when it is missing or sent more than once."""
    values = [value for key, value in scope.get("headers", ()) if key == name]
    return values[0].decode("latin1") if len(values) == 1 else None
