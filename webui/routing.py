"""WebSocket routes; asgi.py wraps them in the origin check and the session's user."""
from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/jobs/<int:job_id>/", consumers.JobConsumer.as_asgi()),
    path("ws/dashboard/", consumers.DashboardConsumer.as_asgi()),
]
