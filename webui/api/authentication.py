"""API tokens: kept hashed (django-rest-knox), and for reads, who one belongs to is cached.

The database holds a SHA-512 hash of each token and its first 15 characters, never the
token: a copy of the database logs nobody in. A token is shown once, when it is made.

Finding a token's user costs a database connection and a query, a third of a
cached list's answer. For GET, HEAD and OPTIONS the user is kept in
services.readcache, made of the AuthToken and User rows: deleting a token or saving
its user (deactivated, no longer staff) makes the next read ask the database.
Requests that change anything always do. What is cached is the user's USER_FIELDS,
never the token nor the password (deferred: read from the database if anything asks).
"""
from __future__ import annotations

import hashlib

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import DEFAULT_DB_ALIAS
from django.utils.translation import gettext as _
from drf_spectacular.contrib.knox_auth_token import KnoxTokenScheme
from knox.auth import TokenAuthentication
from knox.models import AuthToken
from rest_framework import exceptions
from rest_framework.permissions import SAFE_METHODS

from .. import services

# What permissions and views read of request.user.
USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")


def new_token(user: AbstractBaseUser) -> str:
    """A new API token of `user`, which never expires; only its hash is stored."""
    return AuthToken.objects.create(user=user, expiry=None)[1]


class ReadCachedTokenAuthentication(TokenAuthentication):
    def authenticate(self, request):
        self._reading = request.method in SAFE_METHODS
        return super().authenticate(request)

    def authenticate_credentials(self, token: bytes):
        # Tokens are hex; anything else (a NUL, bytes that are not UTF-8) could fail the query.
        if not token.isalnum():
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not self._reading:
            return super().authenticate_credentials(token)
        fields = services.readcache.cached(
            f"token-user:{hashlib.sha256(token).hexdigest()}", (AuthToken, get_user_model()),
            lambda: self._active_user_fields(token))
        return _user_of(fields), None

    def _active_user_fields(self, token: bytes) -> dict:
        user, _token = super().authenticate_credentials(token)
        return {field: getattr(user, field) for field in USER_FIELDS}


def _user_of(fields: dict) -> AbstractBaseUser:
    """The user as read from the database with only `fields` (USER_FIELDS) loaded."""
    model = get_user_model()
    names = [field.attname for field in model._meta.concrete_fields if field.attname in fields]
    return model.from_db(DEFAULT_DB_ALIAS, names, [fields[name] for name in names])


class ReadCachedTokenScheme(KnoxTokenScheme):
    """In the OpenAPI schema: `Authorization: Token <token>`, named as it was with DRF's tokens."""

    target_class = ReadCachedTokenAuthentication
    name = "tokenAuth"
