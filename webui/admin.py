"""Admin pages for every model: lists, filters, search. Changes go through services."""
from django.contrib import admin

from . import services
from .models import Datastore, Disk, Host, Image, Job, Schedule, StatusChange


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "worker", "last_seen", "online"]
    search_fields = ["name", "worker"]
    readonly_fields = ["worker", "last_seen"]

    @admin.display(boolean=True)
    def online(self, host: Host) -> bool:
        return host.is_online()


@admin.register(Datastore)
class DatastoreAdmin(admin.ModelAdmin):
    list_display = ["path", "image_count", "chunk_count", "chunk_bytes", "logical_bytes",
                    "free_bytes", "scanned_at", "last_gc", "last_verify"]
    search_fields = ["path"]
    readonly_fields = ["total_bytes", "free_bytes", "chunk_count", "chunk_bytes", "image_count",
                       "logical_bytes", "scanned_at", "last_gc", "last_verify"]


@admin.register(Disk)
class DiskAdmin(admin.ModelAdmin):
    list_display = ["stable_id", "host", "path", "model", "serial", "size", "present",
                    "protection_state", "last_seen"]
    list_filter = ["present", "host", "kind", "protection_state"]
    search_fields = ["stable_id", "model", "serial", "wwn", "path", "host__name"]
    list_select_related = ["host"]
    readonly_fields = ["first_seen", "last_seen", "protection_state", "alert_after"]


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ["disk", "stamp", "datastore", "mode", "status", "size", "stored_bytes",
                    "new_bytes", "bad_bytes", "verify_ok"]
    list_filter = ["mode", "status", "verify_ok", "datastore"]
    search_fields = ["disk__stable_id", "stamp", "path", "sha256"]
    list_select_related = ["disk__host", "datastore"]
    date_hierarchy = "created"
    # The datastore is the truth: rows change only through a rescan.
    readonly_fields = [field.name for field in Image._meta.fields]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "state", "host", "disk", "target_disk", "worker", "created",
                    "started", "finished"]
    list_filter = ["state", "kind", "host"]
    search_fields = ["disk__stable_id", "target_disk__stable_id", "worker", "error"]
    list_select_related = ["host", "disk__host", "target_disk__host"]
    date_hierarchy = "created"
    readonly_fields = [field.name for field in Job._meta.fields]


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "disk", "datastore", "cron", "time_zone", "mode", "enabled"]
    list_filter = ["kind", "enabled", "mode", "datastore"]
    search_fields = ["disk__stable_id", "datastore__path", "cron"]
    list_select_related = ["disk__host", "datastore"]
    readonly_fields = ["periodic_task", "created"]

    def save_model(self, request, schedule, form, change) -> None:
        super().save_model(request, schedule, form, change)
        services.sync_schedule(schedule)


@admin.register(StatusChange)
class StatusChangeAdmin(admin.ModelAdmin):
    list_display = ["disk", "old", "new", "created", "notified_at"]
    list_filter = ["new", "old"]
    search_fields = ["disk__stable_id"]
    list_select_related = ["disk__host"]
    readonly_fields = ["disk", "old", "new", "created", "notified_at"]
