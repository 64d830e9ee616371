"""A job as JSON, one definition for what GET /api/jobs/<id>/ returns and what the WebSocket
streams (webui/progress.py sends it, webui/consumers.py forwards it)."""
from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

import imaging.base.progress

from .models import Job


class ProgressSerializer(serializers.Serializer):
    """Where a job is, as its worker last reported it; a job that has not started yet has
    each field's default."""

    # Built from a progress event or a saved dict, never validated: read-only, for the schema.
    phase = serializers.CharField(read_only=True, allow_null=True, default=None)
    unit = serializers.CharField(read_only=True, default=imaging.base.progress.UNIT_BYTES)
    done = serializers.IntegerField(read_only=True, default=0)
    total = serializers.IntegerField(read_only=True, default=0)
    rate = serializers.FloatField(read_only=True, default=0.0)
    eta = serializers.FloatField(read_only=True, allow_null=True, default=None)
    bad_bytes = serializers.IntegerField(read_only=True, default=0)
    stored_bytes = serializers.IntegerField(read_only=True, default=0)
    new_bytes = serializers.IntegerField(read_only=True, default=0)
    sent_at = serializers.FloatField(read_only=True, allow_null=True, default=None,
                                     help_text="UNIX time it left the worker")


EMPTY_PROGRESS: dict[str, Any] = {name: field.default
                                  for name, field in ProgressSerializer().fields.items()}


def saved_progress(job: Job) -> dict[str, Any]:
    """The job's progress with every field present."""
    saved = job.progress if isinstance(job.progress, dict) else {}
    return {name: saved.get(name, default) for name, default in EMPTY_PROGRESS.items()}


class JobSerializer(serializers.ModelSerializer):
    """A backup, restore, verify... with its state and progress."""

    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    stalled = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "kind", "state", "stalled", "host", "disk", "image", "target_disk",
                  "progress", "error", "note", "result", "created", "started", "finished",
                  "worker"]

    def get_stalled(self, job: Job) -> bool:
        return job.is_stalled()

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, job: Job) -> dict[str, Any]:
        return saved_progress(job)
