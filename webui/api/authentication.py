"""API token authentication that, for reads, asks the database only when the token changed.

Finding a token's user costs a database connection and a query, a third of a
cached list's answer. For GET, HEAD and OPTIONS the user is kept in
services.readcache, made of the Token and User rows: deleting a token or saving
its user (deactivated, no longer staff) makes the next read ask the database.
Requests that change anything always do. What is cached is the user with its
password left out (deferred: read from the database if anything asks), and
never the token itself.
"""
from __future__ import annotations

import hashlib

from django.contrib.auth import get_user_model
from django.utils.translation import gettext as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.permissions import SAFE_METHODS

from .. import services

# What permissions and views read of request.user.
USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")


class ReadCachedTokenAuthentication(TokenAuthentication):
    def authenticate(self, request):
        self._reading = request.method in SAFE_METHODS
        return super().authenticate(request)

    def authenticate_credentials(self, key):
        if not self._reading:
            return super().authenticate_credentials(key)
        name = f"token-user:{hashlib.sha256(key.encode()).hexdigest()}"
        user = services.readcache.cached(name, (Token, get_user_model()),
                                         lambda: self._active_user(key))
        return user, None

    def _active_user(self, key):
        token = (Token.objects.select_related("user")
                 .only("key", "user", *(f"user__{field}" for field in USER_FIELDS)).filter(key=key)
                 .first())
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return token.user
