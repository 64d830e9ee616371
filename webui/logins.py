"""Login limits, alike at the login page, the admin's and the API's token endpoint.

All three check a password through django.contrib.auth.authenticate(), which
asks AUTHENTICATION_BACKENDS in turn:

- django-axes first refuses an address with AXES_FAILURE_LIMIT failures within
  AXES_COOLOFF_HOURS, whatever usernames they tried (password spraying). A
  login that succeeds does not wipe the count, or any account would reset its
  address's count between guesses at others.
- UsernameRateBackend then allows a username LOGIN_THROTTLE_RATE attempts
  from all addresses together (guesses spread over many addresses). A rate, not
  a lockout: with a lockout anyone could keep a user out; a rate holds them back
  only while the guesses come.

Both answer 429. The API's token endpoint also takes LOGIN_THROTTLE_RATE
requests per address. An address is the peer's, REMOTE_ADDR: uvicorn puts the
client named by X-Forwarded-For there only when the peer is one of
TRUSTED_PROXIES.
"""
from __future__ import annotations

import hashlib

from axes.helpers import get_lockout_message
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.deprecation import MiddlewareMixin
from rest_framework.exceptions import Throttled
from rest_framework.throttling import SimpleRateThrottle

from .api.middleware import API_PREFIX
from .api.throttling import RequestTimes


def lockout_response(request: HttpRequest, original_response=None, credentials=None
                     ) -> HttpResponse:
    """django-axes' 429, as the API answers ({"detail": ...}) or as plain text for a page."""
    message = get_lockout_message()
    if request.path_info.startswith(API_PREFIX):
        return JsonResponse({"detail": message}, status=settings.AXES_HTTP_RESPONSE_CODE)
    return HttpResponse(f"{message}\n", status=settings.AXES_HTTP_RESPONSE_CODE,
                        content_type="text/plain; charset=utf-8")


def client_address(request: HttpRequest) -> str | None:
    """The address django-axes counts: the peer's, whatever else is installed (django-ipware
    would read X-Forwarded-For from anyone)."""
    return request.META.get("REMOTE_ADDR")


class TooManyLogins(Throttled):
    """Raised through authenticate(); DRF answers it 429, LoginRateMiddleware does for pages."""

    default_detail = "Too many login attempts at this username."


class UsernameThrottle(SimpleRateThrottle):
    scope = "login"  # the rate of DEFAULT_THROTTLE_RATES["login"]: LOGIN_THROTTLE_RATE
    cache = RequestTimes()  # a history in Redis is believed only if it could be one

    def __init__(self, username: str):
        super().__init__()
        self.username = username

    def get_cache_key(self, request, view) -> str:
        digest = hashlib.sha256(self.username.casefold().encode()).hexdigest()
        return self.cache_format % {"scope": "login-username", "ident": digest}


class UsernameRateBackend:
    """Authenticates no one: refuses an attempt past the username's rate, else passes on.
    (No get_user: a session is never this backend's, and Django's test client's
    force_login() takes the first backend that has one.)"""

    def authenticate(self, request, username=None, password=None, **credentials):
        if username is not None:
            throttle = UsernameThrottle(str(username))
            if not throttle.allow_request(request, None):
                raise TooManyLogins(throttle.wait())
        return None


class LoginRateMiddleware(MiddlewareMixin):
    def process_exception(self, request: HttpRequest, exception: Exception):
        if not isinstance(exception, TooManyLogins):
            return None
        return HttpResponse(f"{exception.detail}\n", status=exception.status_code,
                            content_type="text/plain; charset=utf-8",
                            headers={"Retry-After": str(exception.wait)} if exception.wait else {})
