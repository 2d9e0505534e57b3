"""Errors on /v1/ in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
OpenAI's status codes: OpenAI's clients raise their own exception classes from them. (The
product's API under /api/ keeps its `{"detail": ...}`.)"""

from django.http import JsonResponse
from rest_framework import exceptions, status

from ..api.errors import exception_handler as api_exception_handler
from ..errors import ChatError, ContextOverflow

# OpenAI's `type` for each status: what its clients and their users read.
TYPES = {
    status.HTTP_401_UNAUTHORIZED: "invalid_request_error",
    status.HTTP_403_FORBIDDEN: "invalid_request_error",
    status.HTTP_404_NOT_FOUND: "invalid_request_error",
    status.HTTP_429_TOO_MANY_REQUESTS: "requests",
}
# OpenAI's `code` for what it names.
CODES = {
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.NotAuthenticated: "invalid_api_key",
    exceptions.Throttled: "rate_limit_exceeded",
    exceptions.MethodNotAllowed: "method_not_allowed",
}


class OpenAIError(exceptions.APIException):
    """An error that names OpenAI's `param` and `code`."""

    def __init__(self, message: str, *, status_code=400, param=None, code=None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        self.error_code = code


def error_body(message: str, status_code: int, *, param=None, code=None) -> dict:
    kind = TYPES.get(status_code)
    if kind is None:
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def exception_handler(exc, context):
    """The product's handler decides the status and headers (Retry-After, WWW-Authenticate);
    the body is put in OpenAI's shape."""
    response = api_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, OpenAIError):
        param, code = exc.param, exc.error_code
    elif isinstance(exc, exceptions.ValidationError):
        param, message = first_problem(exc.detail)
        response.data = error_body(message, response.status_code, param=param)
        return response
    elif isinstance(exc, ContextOverflow):
        # OpenAI's clients know this one as a 400 with its code.
        response.status_code = status.HTTP_400_BAD_REQUEST
        param, code = "messages", "context_length_exceeded"
    else:
        param, code = None, next((c for t, c in CODES.items() if isinstance(exc, t)), None)
    if isinstance(exc, ChatError) or not isinstance(response.data, dict):
        message = str(getattr(exc, "detail", exc))
    else:
        message = str(response.data.get("detail", exc))
    response.data = error_body(message, response.status_code, param=param, code=code)
    return response


def first_problem(detail, param: str = "") -> tuple[str | None, str]:
    """The first of DRF's nested validation errors, as OpenAI's `param` (`messages[1].role`)
    and a sentence naming it."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                child = param
            elif isinstance(key, int) or str(key).isdigit():
                child = f"{param}[{key}]"
            else:
                child = f"{param}.{key}" if param else str(key)
            if value:
                return first_problem(value, child)
    if isinstance(detail, list):
        for index, value in enumerate(detail):
            if isinstance(value, dict | list):
                if value:
                    return first_problem(value, f"{param}[{index}]")
            else:
                return param or None, f"{param}: {value}" if param else str(value)
    return param or None, str(detail)


def not_found(request) -> JsonResponse:
    """A path under /v1/ that is not one of OpenAI's here."""
    body = error_body(
        f"Unknown request URL: {request.method} {request.path}.", 404, code="unknown_url"
    )
    return JsonResponse(body, status=404)
