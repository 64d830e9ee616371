"""The channel layer: channels_redis' pub/sub layer, whose messages are JSON objects.

Anyone able to write to Redis can publish on the layer's channels. What does not decode
as a message is dropped here, turned into one no consumer acts on, rather than raised
into the WebSocket consumer that reads it, which would close that browser's socket.
"""
from __future__ import annotations

import logging

from channels_redis.pubsub import RedisPubSubChannelLayer

log = logging.getLogger(__name__)

# What a consumer receives instead of what was not a message.
UNREADABLE = "layer.unreadable"


class PubSubChannelLayer(RedisPubSubChannelLayer):
    def deserialize(self, message: bytes) -> dict:
        try:
            decoded = super().deserialize(message)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, dict) and isinstance(decoded.get("type"), str):
            return decoded
        log.warning("dropped what is not a message from the channel layer: %.60r", message)
        return {"type": UNREADABLE}
