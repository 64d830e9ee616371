"""Every failure a request can cause becomes a 4xx JSON answer (503 while Redis is down),
never a 500 page."""
from __future__ import annotations

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from .. import services


# When to ask again after a 503: Redis restarting is back within seconds.
RETRY_AFTER_SECONDS = 30


def exception_handler(exc, context):
    if isinstance(exc, services.Unavailable):
        response = _answer({"detail": str(exc)}, status.HTTP_503_SERVICE_UNAVAILABLE)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    if isinstance(exc, services.Refused):
        return _answer({"detail": str(exc)}, status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoValidationError):
        return _answer(as_serializer_error(exc), status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, RequestDataTooBig):
        return _answer({"detail": str(exc)}, status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, SuspiciousOperation):
        return _answer({"detail": "malformed request"}, status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)


def _answer(body, code: int) -> Response:
    set_rollback()
    return Response(body, status=code)
