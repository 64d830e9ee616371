"""Use cases: record inventories and catalogs, start, run and finish jobs, sweep for trouble.

The only code that calls the engine's verbs (the kinds' entries) and that enqueues
work. Views, tasks, consumers, admin and commands call these functions
(`from webui import services`); the pages read the registry of kinds besides.
"""
from . import files, hosts, kinds, live_screen, readcache, registry
from .catalog import (CatalogChange, datastore_at, default_datastore, delete_image,
                      report_inventory, report_local_inventory, rescan)
from .copies import add_remote, copies_of
from .delivery import resend_lost_jobs
from .errors import Refused, Unavailable
from .notifications import notify
from .protection import check_protection
from .rehoming import rehome_host_less_disks
from .running import (WORKER_LOST, cancel_job, check_jobs, claim_job, fail_job,
                      fail_jobs_left_running, finish_job, job_control, job_snapshot)
from .schedules import run_schedule, sync_schedule, sync_schedules, unschedule

# Each kind's request, under the names the views, the API and the commands call.
start_backup = kinds.KINDS["backup"].start
start_restore = kinds.KINDS["restore"].start
start_verify = kinds.KINDS["verify"].start
start_verify_latest = kinds.KINDS["verify"].start_latest
start_boot_test = kinds.KINDS["boot"].start
start_recompress = kinds.KINDS["recompress"].start
start_export = kinds.KINDS["export"].start
start_import = kinds.KINDS["import"].start
start_prune = kinds.KINDS["prune"].start
start_gc = kinds.KINDS["gc"].start
start_sync = kinds.KINDS["sync"].start

__all__ = [
    "CatalogChange", "Refused", "WORKER_LOST", "add_remote", "cancel_job", "copies_of", "check_jobs", "check_protection",
    "claim_job", "datastore_at", "default_datastore", "delete_image",
    "fail_job", "fail_jobs_left_running", "files", "finish_job", "hosts", "kinds", "registry",
    "job_control", "job_snapshot", "notify", "readcache", "rehome_host_less_disks",
    "report_inventory", "report_local_inventory", "rescan", "run_schedule",
    "start_backup", "start_boot_test", "start_export", "start_gc", "start_import",
    "start_prune", "start_recompress", "start_restore", "start_sync", "start_verify",
    "start_verify_latest",
    "sync_schedule", "sync_schedules", "unschedule",
    "Unavailable", "resend_lost_jobs",
]
