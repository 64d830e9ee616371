"""Sessions kept in the database under a hash of their key: a copy of it logs nobody in.

The browser's cookie holds the session key, as with Django's database engine; the
django_session row holds only its BLAKE2b hash, as long as the column (40 hex digits).
Session keys are random (32 of 36 characters), so an unsalted hash is as hard to reverse.
"""
from __future__ import annotations

import hashlib

from django.contrib.sessions.backends import db
from django.contrib.sessions.models import Session
from django.utils import timezone

STORED_KEY_LENGTH = Session._meta.get_field("session_key").max_length


def stored_key(session_key: str) -> str:
    """What the database holds of a session key."""
    return hashlib.blake2b(session_key.encode(), digest_size=STORED_KEY_LENGTH // 2).hexdigest()


class SessionStore(db.SessionStore):
    """Django's database sessions, every row found and written by stored_key(session_key).

    Keeps the class name of Django's: it salts the signature of the session data, so
    sessions made before the keys were hashed still decode.
    """

    def _get_session_from_db(self):
        try:
            return self.model.objects.get(session_key=stored_key(self.session_key),
                                          expire_date__gt=timezone.now())
        except self.model.DoesNotExist:
            self._session_key = None

    async def _aget_session_from_db(self):
        try:
            return await self.model.objects.aget(session_key=stored_key(self.session_key),
                                                 expire_date__gt=timezone.now())
        except self.model.DoesNotExist:
            self._session_key = None

    def exists(self, session_key):
        return super().exists(stored_key(session_key))

    async def aexists(self, session_key):
        return await super().aexists(stored_key(session_key))

    def create_model_instance(self, data):
        row = super().create_model_instance(data)
        row.session_key = stored_key(row.session_key)
        return row

    async def acreate_model_instance(self, data):
        row = await super().acreate_model_instance(data)
        row.session_key = stored_key(row.session_key)
        return row

    def delete(self, session_key=None):
        session_key = session_key or self.session_key
        if session_key is not None:
            super().delete(stored_key(session_key))

    async def adelete(self, session_key=None):
        session_key = session_key or self.session_key
        if session_key is not None:
            await super().adelete(stored_key(session_key))
