"""API tokens and session keys, once kept in the clear, kept hashed from now on.

DRF's tokens (the table authtoken_token, left behind empty) move to knox's table as knox
keeps a token: its SHA-512 and its first characters. Session keys become
webui.sessions.stored_key of themselves. Both go on logging in. SQLite's secure_delete
overwrites what was deleted or replaced, and its WAL is emptied after the change, so that
no copy of the file holds a plaintext key; PostgreSQL rewrites both tables (VACUUM FULL).
"""
from django.db import migrations
from knox.crypto import hash_token
from knox.settings import CONSTANTS

from webui.sessions import stored_key

DRF_TOKENS = "authtoken_token"


def hash_credentials(apps, schema_editor):
    connection = schema_editor.connection
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA secure_delete = ON")
        if DRF_TOKENS in connection.introspection.table_names(cursor):
            knox_tokens = apps.get_model("knox", "AuthToken")._meta.db_table
            cursor.execute(f"SELECT {quote('key')} FROM {DRF_TOKENS}")
            for (key,) in cursor.fetchall():
                cursor.execute(
                    f"INSERT INTO {knox_tokens} (digest, token_key, user_id, created, expiry) "
                    f"SELECT %s, %s, user_id, created, NULL FROM {DRF_TOKENS} "
                    f"WHERE {quote('key')} = %s",
                    [hash_token(key), key[:CONSTANTS.TOKEN_KEY_LENGTH], key])
            cursor.execute(f"DELETE FROM {DRF_TOKENS}")
    sessions = apps.get_model("sessions", "Session").objects
    for key in sessions.values_list("session_key", flat=True):
        sessions.filter(session_key=key).update(session_key=stored_key(key))


def erase_what_was_replaced(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        elif connection.vendor == "postgresql":
            tables = {DRF_TOKENS, "django_session"} & set(
                connection.introspection.table_names(cursor))
            cursor.execute(f"VACUUM FULL {', '.join(sorted(tables))}")


class Migration(migrations.Migration):
    # The WAL is emptied, and PostgreSQL vacuums, only outside a transaction.
    atomic = False

    dependencies = [
        ("webui", "0007_host_access"),
        ("knox", "0009_extend_authtoken_field"),
        ("sessions", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(hash_credentials, migrations.RunPython.noop, atomic=True),
        migrations.RunPython(erase_what_was_replaced, migrations.RunPython.noop),
    ]
