"""Refuses an API request whose body is too big before anything reads it.

Django checks DATA_UPLOAD_MAX_MEMORY_SIZE when `request.body` or `request.POST`
is read, but DRF's parsers read the stream itself, past that check.
"""
from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.utils.deprecation import MiddlewareMixin

API_PREFIX = "/api/"


class ApiBodyLimitMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest):
        if not request.path_info.startswith(API_PREFIX):
            return None
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"detail": "Content-Length is not a number"}, status=400)
        if limit is not None and length > limit:
            return JsonResponse({"detail": f"request body of {length} bytes is over the "
                                           f"limit of {limit} bytes"}, status=413)
        return None
