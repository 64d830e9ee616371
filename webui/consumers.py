"""WebSockets: authenticate, join the group, forward what the progress sender sends.

Nothing a client sends is read: actions are API requests (auth, CSRF, throttling).
"""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import services
from .progress import DASHBOARD_GROUP, job_group


class WatchingConsumer(AsyncJsonWebsocketConsumer):
    async def join(self, group: str) -> None:
        self.groups.append(group)  # left again on disconnect by the base class
        await self.channel_layer.group_add(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Ignored unparsed: a frame that is not JSON must not end the stream."""

    async def job_progress(self, event) -> None:
        await self.send_json(event["data"])

    async def job_state(self, event) -> None:
        await self.send_json(event["data"])


class JobConsumer(WatchingConsumer):
    """/ws/jobs/<id>/: the job as GET /api/jobs/<id>/ shows it, then its events."""

    async def connect(self) -> None:
        if not self.scope["user"].is_authenticated:
            await self.close()
            return
        job_id = self.scope["url_route"]["kwargs"]["job_id"]
        # Joined before reading the snapshot, so a transition in between is not lost.
        await self.join(job_group(job_id))
        snapshot = await database_sync_to_async(services.job_snapshot)(job_id)
        if snapshot is None:
            await self.close()
            return
        await self.accept()
        await self.send_json(snapshot)


class DashboardConsumer(WatchingConsumer):
    """/ws/dashboard/: every job's transitions and progress."""

    async def connect(self) -> None:
        if not self.scope["user"].is_authenticated:
            await self.close()
            return
        await self.join(DASHBOARD_GROUP)
        await self.accept()
