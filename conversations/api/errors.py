"""Every API error is JSON with a human-readable `detail`."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from ..errors import ChatError


def exception_handler(exc, context):
    if isinstance(exc, RequestDataTooBig):
        size = context["request"].META.get("CONTENT_LENGTH")
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        said = f"is {size} bytes" if size else "is larger than that"
        return Response(
            {"detail": f"The request body {said}; the limit is {limit} bytes."},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, ChatError):
        from .serializers import ExchangeSerializer

        body = {"detail": exc.detail}
        if exc.exchange is not None:
            body.update(ExchangeSerializer(exc.exchange).data)
        response = Response(body, status=exc.status_code)
        if (wait := getattr(exc, "retry_after", None)) is not None:
            response["Retry-After"] = str(wait)
        return response

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


def page_not_found(request, exception):
    """Django's 404 for pages; JSON with a `detail`, like every other API error, under /api/;
    OpenAI's error under /v1/."""
    if request.path.startswith("/v1/"):
        from ..openai_api.errors import not_found

        return not_found(request)
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    return defaults.page_not_found(request, exception)
