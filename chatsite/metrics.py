"""GET /metrics for Prometheus, and the middleware that counts HTTP requests.

Off unless CHATBOT_METRICS is on (the URL answers 404). With CHATBOT_METRICS_TOKEN set, a
scrape must send `Authorization: Bearer <token>`; without it the endpoint is open, for a server
on a private network. Like the health checks it is a plain Django view: no session, CSRF token
or rate limit applies, and it answers over plain HTTP (settings.SECURE_REDIRECT_EXEMPT). What
is measured, and how: conversations/metrics.py.
"""

import functools
import hmac
import re
import time
from collections.abc import Callable

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from conversations import metrics

# A request no URL pattern matched: one label value for all of them.
UNMATCHED = "<unmatched>"
# A regular expression's named group, as DRF's router writes them: `(?P<pk>[^/.]+)`.
NAMED_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")


@csrf_exempt
@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not settings.CHATBOT_METRICS:
        raise Http404
    token = settings.CHATBOT_METRICS_TOKEN
    if token:
        sent = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            response = HttpResponse(
                "unauthorized", status=401, content_type="text/plain; charset=utf-8"
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    body, content_type = metrics.render(request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type)


def route_of(request: HttpRequest) -> str:
    """The URL pattern that answered (`api/conversations/<uuid:pk>/messages/`), never the path:
    ids and typos would each make a new series."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return UNMATCHED
    return _readable(match.route) or match.view_name or UNMATCHED


@functools.lru_cache(maxsize=512)
def _readable(route: str) -> str:
    """A regular expression's route as a path pattern: `conversations/(?P<pk>[^/.]+)/$` ->
    `conversations/<pk>/`."""
    return NAMED_GROUP.sub(r"<\1>", route).removeprefix("^").removesuffix("$")


class MetricsMiddleware:
    """Counts each response and how long it took, when it is returned (a streamed reply counts
    then, not when its body ends). Scrapes of /metrics are not counted."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not settings.CHATBOT_METRICS:
            return self.get_response(request)
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        if match is None or match.func is not metrics_view:
            seconds = time.perf_counter() - started
            metrics.request_answered(
                request.method or "", route_of(request), response.status_code, seconds
            )
        return response
