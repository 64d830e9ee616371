"""WebSockets: authenticate, join the group, forward what the progress sender sends.

Nothing a client sends is read: actions are API requests (auth, CSRF, throttling).
"""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import services
from .progress import DASHBOARD_GROUP, PROGRESS_MESSAGE, STATE_MESSAGE, job_group

FORWARDED = {PROGRESS_MESSAGE, STATE_MESSAGE}


class WatchingConsumer(AsyncJsonWebsocketConsumer):
    async def join(self, group: str) -> None:
        self.groups.append(group)  # left again on disconnect by the base class
        await self.channel_layer.group_add(group, self.channel_name)

    async def dispatch(self, message) -> None:
        # The base class closes stale database connections before each message: a hop to the
        # database thread and back, one at a time for every consumer of the process. Events
        # are only forwarded, touching no database; with 200 watchers those hops were most of
        # the server's work per event.
        if message["type"] in FORWARDED:
            await self.send_json(message["data"])
        elif message["type"].startswith("websocket."):
            await super().dispatch(message)
        # Anything else came through the channel layer, where any writer to Redis can
        # publish (channel_layer.UNREADABLE among others): dropped, the socket stays open.

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Ignored unparsed: a frame that is not JSON must not end the stream."""


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
