"""Middleware: an API request's body size, checked first; the chain run in one thread.

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


class OneThreadMiddleware:
    """Last in MIDDLEWARE: under ASGI, the middleware above it run in one thread, as the view does.

    On an ASGI server Django runs every middleware that can be async (Django's own, through
    MiddlewareMixin) in async mode, and each of their process_request and process_response
    then hops to a thread and back: two dozen hops, some 4 ms of a cached list's 7 ms. Below
    a middleware that is sync only, Django runs the whole chain synchronously instead, in the
    request's thread, with one hop in and one to the (sync) view.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest):
        return self.get_response(request)
