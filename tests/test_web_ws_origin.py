"""WebSocket origins, against the real server: only the server's own origin (scheme, host and
port, as the Host header names it and ALLOWED_HOSTS allows) or one of CSRF_TRUSTED_ORIGINS may
open a stream with the user's cookie; a page on another port of the same machine may not."""
import socket

import pytest
from django.contrib.auth.models import User
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


@pytest.fixture
def viewer_cookie(transactional_db) -> str:
    """A logged-in viewer's session cookie, the session in the database the server reads."""
    client = Client()
    client.force_login(User.objects.create_user("bob", password="bob-password-1"),
                       backend="django.contrib.auth.backends.ModelBackend")
    return f"sessionid={client.cookies['sessionid'].value}"


@pytest.fixture
def behind_a_proxy(live_environment):
    """The server trusts the proxy on loopback, and a page elsewhere opens the dashboard."""
    live_environment.update(TRUSTED_PROXIES="127.0.0.1",
                            CSRF_TRUSTED_ORIGINS="https://dash.example.org,https://*.lab.example.org")


def opens(server, cookie: str, origin: str | None, host: str = "127.0.0.1",
          headers: dict | None = None) -> bool:
    """Whether /ws/dashboard/ opens for this Origin, the request naming `host` (with the
    server's port) in its Host header; a refusal must be the handshake's 403."""
    additional = {"Cookie": cookie, **(headers or {})}
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            with connect(f"ws://{host}:{server.port}/ws/dashboard/", sock=sock, origin=origin,
                         additional_headers=additional, open_timeout=10):
                return True
        except InvalidStatus as refused:
            assert refused.response.status_code == 403, refused.response
            return False


def test_only_the_servers_own_origin_opens_a_stream(viewer_cookie, live_server_process):
    server = live_server_process
    port = server.port
    assert opens(server, viewer_cookie, f"http://127.0.0.1:{port}")
    assert opens(server, viewer_cookie, f"http://localhost:{port}", host="localhost")

    assert not opens(server, viewer_cookie, "http://127.0.0.1:9999"), "another port"
    assert not opens(server, viewer_cookie, f"http://127.0.0.1:{port + 1}"), "another port"
    assert not opens(server, viewer_cookie, "http://127.0.0.1"), "no port: port 80"
    assert not opens(server, viewer_cookie, f"https://127.0.0.1:{port}"), "another scheme"
    assert not opens(server, viewer_cookie, f"http://localhost:{port}"), "another host"
    assert not opens(server, viewer_cookie, "http://evil.example")
    assert not opens(server, viewer_cookie, None), "no Origin"
    assert not opens(server, viewer_cookie, "null")
    # A name that resolves here but is not one of ALLOWED_HOSTS (DNS rebinding).
    assert not opens(server, viewer_cookie, f"http://evil.example:{port}", host="evil.example")
    # X-Forwarded-Proto is believed from no one by default.
    assert not opens(server, viewer_cookie, f"https://127.0.0.1:{port}",
                     headers={"X-Forwarded-Proto": "https"})
    assert server.alive()
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_behind_a_tls_proxy_wss_is_https_and_trusted_origins_open_it(
        behind_a_proxy, viewer_cookie, live_server_process):
    server = live_server_process
    port = server.port
    tls = {"X-Forwarded-Proto": "https"}
    assert opens(server, viewer_cookie, f"https://127.0.0.1:{port}", headers=tls)
    assert not opens(server, viewer_cookie, f"http://127.0.0.1:{port}", headers=tls)
    assert opens(server, viewer_cookie, "https://dash.example.org", headers=tls)
    assert opens(server, viewer_cookie, "https://nas.lab.example.org")
    assert not opens(server, viewer_cookie, "http://dash.example.org"), "another scheme"
    assert not opens(server, viewer_cookie, "https://dash.example.org:8443"), "another port"
    assert not opens(server, viewer_cookie, "https://lab.example.org.evil.example")
    assert "Traceback" not in server.log(), server.log()[-3000:]
