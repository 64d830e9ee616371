"""The JSON shapes the API returns and takes (a job's, shared with the WebSocket, is in
webui/payloads.py: docs/architecture.md, Progress events)."""
from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from django.contrib.auth import get_user_model
from rest_framework import serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer

from ..models import Datastore, Disk, Host, Image, Protection, Schedule
from ..parameters import BACKUP_MODES, MAX_LEVEL, MIN_LEVEL, RETENTION_RULES


class RejectUnknownFields:
    # A field the serializer does not know is refused: a typo must not pass for a default.
    # (Serializers' docstrings are the schema's descriptions, for the API's users.)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().to_internal_value(data)


class StrictSerializer(RejectUnknownFields, serializers.Serializer):
    """Parameters of an action; unknown fields are refused."""


class HostSerializer(serializers.ModelSerializer):
    """A machine with disks; online while its worker reports."""

    online = serializers.SerializerMethodField()

    class Meta:
        model = Host
        fields = ["id", "name", "queue", "worker", "last_seen", "online"]

    def get_online(self, host: Host) -> bool:
        return host.is_online()


class DiskSerializer(serializers.ModelSerializer):
    """A disk of a host, present or gone, and whether its backups are on time."""

    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    last_backup = serializers.DateTimeField(read_only=True, allow_null=True,
                                            help_text="when its newest image was taken")
    overdue = serializers.SerializerMethodField()
    protection = serializers.SerializerMethodField()

    class Meta:
        model = Disk
        fields = ["id", "stable_id", "host", "model", "serial", "size", "path", "present",
                  "last_backup", "overdue", "protection"]

    def to_representation(self, disk: Disk) -> dict[str, Any]:
        # The disk comes from Disk.objects.with_protection_facts(): this costs no query.
        self._protection = disk.protection()  # read by both fields below
        return super().to_representation(disk)

    def get_overdue(self, disk: Disk) -> bool:
        return self._protection == Protection.OVERDUE

    @extend_schema_field(serializers.ChoiceField(choices=[state.value for state in Protection]))
    def get_protection(self, disk: Disk) -> str:
        return self._protection.value


class ImageSerializer(serializers.ModelSerializer):
    """One backup of a disk in a datastore."""

    verified = serializers.BooleanField(read_only=True)

    class Meta:
        model = Image
        fields = ["id", "disk", "stamp", "mode", "status", "size", "stored_bytes", "new_bytes",
                  "bad_bytes", "sha256", "created", "seconds", "verified", "encrypted",
                  "protected"]


# What image_listing() reads: ImageSerializer's fields as columns.
IMAGE_COLUMNS = ["id", "disk_id", "stamp", "mode", "status", "size", "stored_bytes", "new_bytes",
                 "bad_bytes", "sha256", "created", "seconds", "verify_ok", "encrypted",
                 "protected"]
_DATETIME = serializers.DateTimeField()


def image_listing(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """ImageSerializer's shape from `.values(*IMAGE_COLUMNS)` rows, for lists: a fifth of the
    time of serializing model instances field by field, the same JSON."""
    return [{"id": row["id"], "disk": row["disk_id"], "stamp": row["stamp"], "mode": row["mode"],
             "status": row["status"], "size": row["size"], "stored_bytes": row["stored_bytes"],
             "new_bytes": row["new_bytes"], "bad_bytes": row["bad_bytes"], "sha256": row["sha256"],
             "created": _DATETIME.to_representation(row["created"]), "seconds": row["seconds"],
             "verified": bool(row["verify_ok"]), "encrypted": row["encrypted"],
             "protected": row["protected"]} for row in rows]


class DatastoreSerializer(serializers.ModelSerializer):
    """Where images are kept: usage, chunks, deduplication, last gc and verify; for an
    rclone: remote that copies fill, its path with what a connection string holds secret
    as ***."""

    path = serializers.CharField(source="shown_path", read_only=True)
    used_bytes = serializers.IntegerField(read_only=True)
    dedup_ratio = serializers.FloatField(read_only=True, allow_null=True,
                                         help_text="disk bytes each stored byte stands for")
    remote = serializers.BooleanField(source="is_remote", read_only=True)
    encrypted = serializers.BooleanField(read_only=True)

    class Meta:
        model = Datastore
        fields = ["id", "path", "label", "remote", "offsite", "bwlimit", "encrypted",
                  "fingerprint", "total_bytes", "free_bytes", "used_bytes", "chunk_count",
                  "chunk_bytes", "image_count", "logical_bytes", "dedup_ratio", "scanned_at",
                  "last_gc", "last_verify"]


class ScheduleSerializer(RejectUnknownFields, serializers.ModelSerializer):
    """When a disk is backed up (or a datastore verified or collected), how, and what is kept.

    `notify_urls` only for staff: Apprise URLs carry bot tokens and mail passwords."""

    next_run = serializers.SerializerMethodField()
    notify_url_count = serializers.SerializerMethodField(
        help_text="how many notification URLs it has (the URLs, notify_urls, are for staff)")

    class Meta:
        model = Schedule
        fields = ["id", "kind", "disk", "datastore", "destination", "after_backup", "copy_last",
                  "cron",
                  "time_zone", "mode", "level", "deltas",
                  *(f"keep_{rule}" for rule in RETENTION_RULES), "enabled", "grace",
                  "offsite_within", "boot_within",
                  "notify_urls", "notify_url_count",
                  "notify_on_success", "created", "next_run"]
        read_only_fields = ["created"]
        extra_kwargs = {"grace": {"min_value": dt.timedelta(0),
                                  "max_value": dt.timedelta(days=365)},
                        "offsite_within": {"min_value": dt.timedelta(hours=1),
                                           "max_value": dt.timedelta(days=365)},
                        "boot_within": {"min_value": dt.timedelta(days=1),
                                        "max_value": dt.timedelta(days=365)}}

    def get_fields(self):
        fields = super().get_fields()
        user = getattr(self.context.get("request"), "user", None)
        if not (user and user.is_staff):
            del fields["notify_urls"]
        return fields

    def get_notify_url_count(self, schedule: Schedule) -> int:
        return len(schedule.notification_urls())

    def get_next_run(self, schedule: Schedule) -> dt.datetime | None:
        if not schedule.enabled:
            return None
        return schedule.next_run_after(timezone.now())

    def validate(self, attrs):
        # The model's own rules (a backup schedule names its disk...) on the row as edited;
        # DRF turns Django's ValidationError into field errors.
        candidate = copy.copy(self.instance) if self.instance is not None else Schedule()
        for name, value in attrs.items():
            setattr(candidate, name, value)
        candidate.clean()
        return attrs


class BackupSerializer(StrictSerializer):
    """How to take this backup; left out, as the disk's schedule says."""

    mode = serializers.ChoiceField(choices=BACKUP_MODES, required=False)
    level = serializers.IntegerField(min_value=MIN_LEVEL, max_value=MAX_LEVEL, required=False)
    datastore = serializers.PrimaryKeyRelatedField(queryset=Datastore.objects.folders(),
                                                   required=False)
    deltas = serializers.BooleanField(
        required=False, help_text="store changed chunks as deltas against the previous image's")


class DiskIdField(serializers.IntegerField):
    """A disk's database id as a JSON number: never a path, never a string of digits."""

    default_error_messages = {
        "invalid": "a disk is named by its id from /api/disks/ (a whole number), not {kind}",
        "path": "a disk is named by its id from /api/disks/, never by a path",
    }

    def to_internal_value(self, data):
        if isinstance(data, str) and data.startswith("/"):
            self.fail("path")
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid", kind=f"a {type(data).__name__}")
        return data


class PartitionNumberField(serializers.IntegerField):
    """A partition's number in the image's layout, as a JSON number."""

    default_error_messages = {
        "invalid": "a partition is named by its number (1, 2, ...), not {kind}",
    }

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid", kind=f"a {type(data).__name__}")
        return super().to_internal_value(data)


class RestoreSerializer(StrictSerializer):
    """The disk to overwrite, by its id, and its stable_id typed again to confirm; with
    `partition`, only that partition of the image is written."""

    target_disk = DiskIdField(help_text="the id of the disk to overwrite")
    confirm = serializers.CharField(max_length=200, trim_whitespace=False,
                                    help_text="the target disk's stable_id, typed to confirm")
    partition = PartitionNumberField(required=False, min_value=1, max_value=999_999,
                                     help_text="write only this partition of the image")


class CredentialsSerializer(AuthTokenSerializer):
    """A username and password; a username longer than any user's is refused before anyone
    tries it (django-axes would record it, and PostgreSQL refuses its column that long)."""

    username = serializers.CharField(max_length=get_user_model()._meta.get_field(
        get_user_model().USERNAME_FIELD).max_length, write_only=True)


class NewTokenSerializer(serializers.Serializer):
    """A new API token, shown this once: only its hash is kept."""

    token = serializers.CharField(help_text="send it as `Authorization: Token <token>`")


class NoParametersSerializer(StrictSerializer):
    """An action that takes no parameters."""


class JobStartedSerializer(serializers.Serializer):
    """The job that was queued (or asked to stop)."""

    job = serializers.IntegerField(help_text="the job's id: follow it at /api/jobs/<id>/")
