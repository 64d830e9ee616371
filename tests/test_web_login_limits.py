"""Login limits on the real server, the same at the login page, the admin's and the API's token
endpoint: an address that fails too often is locked out whatever the usernames it tries, a
username takes a limited rate of attempts from all addresses together, and X-Forwarded-For
names the client only when a proxy of TRUSTED_PROXIES sends it."""
import itertools
import re

import pytest
import requests
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.models import User
from knox.models import AuthToken

PASSWORD = "correct horse battery staple"
LOCKED = 429
# Spoofed client addresses, a new one for every request.
_addresses = (f"10.{n // 250}.{n % 250}.1" for n in itertools.count(1))


def spoofed() -> dict[str, str]:
    return {"X-Forwarded-For": next(_addresses)}


def rate_limit() -> int:
    """How many attempts LOGIN_THROTTLE_RATE allows in its window."""
    return int(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["login"].split("/")[0])


@pytest.fixture
def users(transactional_db):
    # Both staff: the admin's login page takes staff only.
    for name in ("alice", "bob"):
        User.objects.create_user(name, password=PASSWORD, is_staff=True)


@pytest.fixture
def behind_a_proxy(live_environment):
    live_environment["TRUSTED_PROXIES"] = "127.0.0.1, ::1"


class Logins:
    """Log in at one of the three places, as a browser (with its CSRF token) or a script."""

    def __init__(self, server, place: str):
        self.server, self.place = server, place

    def attempt(self, username: str, password: str, headers: dict | None = None) -> int:
        headers = headers or {}
        if self.place == "api":
            return requests.post(f"{self.server.url}/api/auth/token/", timeout=60,
                                 json={"username": username, "password": password},
                                 headers=headers).status_code
        path = "/accounts/login/" if self.place == "page" else "/admin/login/"
        browser = requests.Session()
        form = browser.get(f"{self.server.url}{path}", headers=headers, timeout=60)
        if form.status_code != 200:
            return form.status_code
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        answer = browser.post(f"{self.server.url}{path}", headers=headers, timeout=60,
                              allow_redirects=False,
                              data={"username": username, "password": password,
                                    "csrfmiddlewaretoken": csrf, "next": "/"})
        if answer.status_code == 200:
            return 400  # the form again, with "Please enter a correct username and password"
        return answer.status_code

    def succeeded(self, status: int) -> bool:
        return status == (200 if self.place == "api" else 302)


PLACES = ["page", "admin", "api"]


@pytest.mark.parametrize("place", PLACES)
def test_a_spoofed_x_forwarded_for_neither_escapes_the_lockout_nor_names_the_client(
        private_redis, live_server_process, users, place):
    logins = Logins(live_server_process, place)
    limit = settings.AXES_FAILURE_LIMIT
    headers = [spoofed() for _ in range(limit + 3)]
    statuses = [logins.attempt("alice", f"guess-{n}", headers[n]) for n in range(limit + 2)]
    assert statuses[:limit - 1] == [400] * (limit - 1), statuses
    assert statuses[limit - 1:] == [LOCKED] * 3, statuses
    assert logins.attempt("alice", PASSWORD, headers[-1]) == LOCKED
    assert not AuthToken.objects.exists()
    # What the server took for the client's address: the peer's, not the header's.
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"127.0.0.1"}
    log = live_server_process.log()
    assert not [header for header in headers if header["X-Forwarded-For"] in log]


@pytest.mark.parametrize("place", PLACES)
def test_spraying_usernames_from_one_address_locks_that_address_out(
        private_redis, live_server_process, users, place):
    logins = Logins(live_server_process, place)
    limit = settings.AXES_FAILURE_LIMIT
    names = [f"user{n}" for n in range(limit - 1)]
    assert [logins.attempt(name, "Summer2026!") for name in names] == [400] * (limit - 1)
    # Logging in to one's own account does not wipe the address's failures.
    assert logins.succeeded(logins.attempt("alice", PASSWORD))
    assert logins.attempt("carol", "Summer2026!") == LOCKED
    # Every username is refused from there, the right password too, at every login.
    assert logins.attempt("alice", PASSWORD) == LOCKED
    assert Logins(live_server_process, "api" if place != "api" else "page").attempt(
        "alice", PASSWORD) == LOCKED


@pytest.mark.parametrize("place", PLACES)
def test_a_username_takes_a_limited_rate_of_attempts_from_all_addresses(
        behind_a_proxy, private_redis, live_server_process, users, place):
    logins = Logins(live_server_process, place)
    limit = rate_limit()
    # One guess per address: no address comes near its lockout.
    statuses = [logins.attempt("alice", f"guess-{n}", spoofed()) for n in range(limit + 2)]
    assert statuses == [400] * limit + [LOCKED] * 2, statuses
    assert logins.attempt("alice", PASSWORD, spoofed()) == LOCKED
    # Another username is not slowed down with it.
    assert logins.succeeded(logins.attempt("bob", PASSWORD, spoofed()))
    # Behind the trusted proxy, the header names the client: one address per attempt.
    assert AccessAttempt.objects.filter(username="alice").count() == limit
    assert "Traceback" not in live_server_process.log()
