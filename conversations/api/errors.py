"""Every API error is JSON with a human-readable `detail`."""

from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from ..errors import ChatError


def exception_handler(exc, context):
    if isinstance(exc, ChatError):
        from .serializers import ExchangeSerializer

        body = {"detail": exc.detail}
        if exc.exchange is not None:
            body.update(ExchangeSerializer(exc.exchange).data)
        return Response(body, status=exc.status_code)

    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.ValidationError):
        response.data = {"detail": _summarize(exc.detail), "errors": exc.detail}
    return response


def _summarize(detail, field: str = "") -> str:
    """One sentence from DRF's nested validation errors: 'content: This field is required.'"""
    if isinstance(detail, dict):
        parts = [_summarize(value, key) for key, value in detail.items()]
        return " ".join(part for part in parts if part)
    if isinstance(detail, list):
        return " ".join(_summarize(item, field) for item in detail)
    prefix = f"{field}: " if field and field != "non_field_errors" else ""
    return f"{prefix}{detail}"
