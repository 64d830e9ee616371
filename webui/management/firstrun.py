"""What a first start does before the services run: the database's tables and static files,
and the first admin account (`manage.py up`, `manage.py install_units`)."""
from __future__ import annotations

import secrets
from collections.abc import Callable

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

ADMIN_USERNAME = "admin"


def prepare_database(say: Callable[[str], None]) -> None:
    database = settings.DATABASES["default"]
    where = database["NAME"] if "sqlite" in database["ENGINE"] else \
        f"{database['NAME']} on {database.get('HOST') or 'localhost'}"
    say(f"database: {where}: applying migrations")
    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)


def ensure_admin() -> str:
    """Create the admin account on first run; say how to log in."""
    users = get_user_model()
    admin = users.objects.filter(is_superuser=True).order_by("pk").first()
    if admin is not None:
        return (f"log in as {admin.get_username()} with its password "
                f"(forgotten? python manage.py changepassword {admin.get_username()})")
    if settings.ADMIN_PASSWORD:
        users.objects.create_superuser(ADMIN_USERNAME, email="", password=settings.ADMIN_PASSWORD)
        return f"log in as {ADMIN_USERNAME} with the password in ADMIN_PASSWORD"
    password = secrets.token_urlsafe(12)
    users.objects.create_superuser(ADMIN_USERNAME, email="", password=password)
    return (f"log in as {ADMIN_USERNAME}, password {password}\n"
            "  (shown this once: only its hash is kept; change it on the admin pages)")
