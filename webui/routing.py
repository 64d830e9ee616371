"""WebSocket routes; asgi.py wraps them in the origin check and the session's user.

A path no consumer serves is closed before it is accepted (the handshake's 403),
not left to the router, which raises.
"""
from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from . import consumers
from .urls import IdConverter  # noqa: F401 (its module registers <id:...>, the ids rows have)

websocket_urlpatterns = [
    path("ws/jobs/<id:job_id>/", consumers.JobConsumer.as_asgi()),
    path("ws/dashboard/", consumers.DashboardConsumer.as_asgi()),
    re_path(r"", WebsocketDenier.as_asgi()),
]
