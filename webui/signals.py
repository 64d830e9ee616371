"""Signal handlers: how a worker joins, what a deleted schedule leaves behind, and which
writes make the API's cached reads stale.

A worker consumes its host's queue and the control queue whatever its command
line says; when it is ready it fails the jobs its previous life left running
(nothing runs yet in a worker that has just started), reports this host's
disks, and keeps reporting them every INVENTORY_INTERVAL_SECONDS, which is
what keeps the host online; after each report it hands what disks named
without their host still hold to each host's own (services.rehoming).
"""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import celeryd_after_setup, worker_ready
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from knox.models import AuthToken

from . import services
from .models import Datastore, Disk, Host, Image, Job, Schedule, rows_changed

log = logging.getLogger(__name__)


@celeryd_after_setup.connect
def consume_host_queues(sender, instance, **kwargs) -> None:
    queues = instance.app.amqp.queues
    for name in (Host(name=settings.HOST_NAME).queue, settings.CELERY_TASK_DEFAULT_QUEUE):
        queues.select_add(name)


@worker_ready.connect
def join(sender, **kwargs) -> None:
    worker = sender.hostname
    try:
        lost = services.fail_jobs_left_running(worker)
        if lost:
            log.warning("%s: %d job(s) of this worker's previous run failed as worker lost",
                        worker, lost)
    except Exception:
        log.exception("%s: cannot look for jobs left running", worker)
    _report_inventory(worker)
    threading.Thread(target=_keep_reporting, args=(worker,), name="inventory", daemon=True).start()


def _keep_reporting(worker: str) -> None:
    while True:
        time.sleep(settings.INVENTORY_INTERVAL_SECONDS)
        _report_inventory(worker)
        connection.close()


def _report_inventory(worker: str) -> None:
    try:
        services.report_local_inventory(worker)
    except Exception:
        # A failing lsblk or database must not stop the worker; the host shows offline.
        log.exception("%s: inventory not reported", worker)
    try:
        services.rehome_host_less_disks()
    except Exception:
        log.exception("%s: disks named without their host not rehomed", worker)


@receiver(post_delete, sender=Schedule)
def unschedule(sender, instance: Schedule, **kwargs) -> None:
    services.unschedule(instance)


# What the API's lists are made of; connected per model, so other models keep their fast
# deletes (Django fetches rows before a delete only for models someone listens to).
LISTED_MODELS = (Host, Disk, Datastore, Image, Job, Schedule)


def rows_written(sender, **kwargs) -> None:
    services.readcache.changed(sender)


for model in LISTED_MODELS:
    for signal in (post_save, post_delete, rows_changed):
        signal.connect(rows_written, sender=model, dispatch_uid=f"readcache.{model.__name__}")
# Who a token belongs to, as the API's reads remember it.
for model in (AuthToken, get_user_model()):
    for signal in (post_save, post_delete):
        signal.connect(rows_written, sender=model, dispatch_uid=f"readcache.{model.__name__}")
