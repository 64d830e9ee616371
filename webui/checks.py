"""System checks on settings values: a bad setting fails `manage.py check` with its name."""
from __future__ import annotations

import re

from django.conf import settings
from django.core.checks import Error, Warning, register

from .models import HOST_NAME_RE


@register()
def check_host_name(app_configs, **kwargs):
    if not re.match(HOST_NAME_RE, settings.HOST_NAME or ""):
        return [Error(f"HOST_NAME={settings.HOST_NAME!r} cannot name a Celery queue",
                      hint="use letters, digits and ._- only (at most 63)", id="webui.E001")]
    return []


@register()
def check_datastore(app_configs, **kwargs):
    store = settings.IMAGING_DATASTORE
    if store.exists() and not store.is_dir():
        return [Error(f"IMAGING_DATASTORE={str(store)!r} is not a directory", id="webui.E002")]
    return []


@register(deploy=True)
def check_allowed_hosts(app_configs, **kwargs):
    if "*" in settings.ALLOWED_HOSTS:
        return [Warning("ALLOWED_HOSTS allows every host, so WebSockets accept every Origin",
                        hint="list this server's names in ALLOWED_HOSTS", id="webui.W001")]
    return []
