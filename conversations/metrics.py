"""What the server tells Prometheus (GET /metrics, chatsite/metrics.py): every metric and the
rule for each reading, in one place. Nothing is recorded while CHATBOT_METRICS is off.

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it when metrics are on), every worker
writes its figures to files there and a scrape adds up all the workers'; otherwise a scrape sees
this process alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY

from .llm.interface import Generation

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
REPLY_STATUSES = ("ok", "cancelled", "error", "interrupted")
# Methods outside these are counted as "other": a client must not be able to add label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "chatbot_http_requests",
    "HTTP requests answered, by method, URL pattern and status code.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "chatbot_http_request_duration_seconds",
    "Seconds from a request's arrival to its response (a stream: before its body is sent).",
    ["method", "route"],
)
REPLIES = Counter("chatbot_replies", "Replies ended, by their final status.", ["status"])
TTFT_SECONDS = Histogram(
    "chatbot_reply_ttft_seconds",
    "Seconds from a reply's start to its first token (replies that wrote one).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
TOKENS_PER_SECOND = Histogram(
    "chatbot_reply_tokens_per_second",
    "Tokens a second after a reply's first: (completion tokens - 1) / (total - ttft).",
    buckets=(1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500),
)
STREAMS_IN_FLIGHT = Gauge(
    "chatbot_streams_in_flight",
    "Replies being written by this server now.",
    multiprocess_mode="livesum",
)
ENGINE_QUEUE = Gauge(
    "chatbot_engine_queue_depth",
    "Replies the engine holds: waiting for the model or being written (embedded engine), or "
    "in flight to the inference server.",
    multiprocess_mode="livesum",
)
for _status in REPLY_STATUSES:
    REPLIES.labels(_status)  # listed at 0 from the start


def enabled() -> bool:
    return bool(settings.CHATBOT_METRICS)


# Replies (conversations/replies.py)


@contextmanager
def reply_streaming() -> Iterator[None]:
    """Around the writing of one reply: it counts in the streams in flight meanwhile."""
    if not enabled():
        yield
        return
    STREAMS_IN_FLIGHT.inc()
    _refresh_engine_queue()
    try:
        yield
    finally:
        STREAMS_IN_FLIGHT.dec()
        _refresh_engine_queue()


def reply_ended(status: str, result: Generation | None = None) -> None:
    """A reply's final status, and the timings of its run when it has one."""
    if not enabled():
        return
    REPLIES.labels(status if status in REPLY_STATUSES else "error").inc()
    if result is None or result.completion_tokens < 1:
        return
    TTFT_SECONDS.observe(result.ttft_ms / 1000)
    after_first = (result.total_ms - result.ttft_ms) / 1000
    if result.completion_tokens > 1 and after_first > 0:
        TOKENS_PER_SECOND.observe((result.completion_tokens - 1) / after_first)


# HTTP requests (chatsite/metrics.py's middleware)


def request_answered(method: str, route: str, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_SECONDS.labels(method, route).observe(seconds)


# The engine


def _engine_queue_depth() -> float:
    from .runtime import get_engine

    try:
        return float(get_engine().queue_depth())
    except Exception:  # an engine that cannot be built from settings: nothing queued
        return 0.0


def _refresh_engine_queue() -> None:
    # Each worker writes its own figure (read at its reply starts and ends, and its scrapes);
    # a single process reads it at scrape time.
    if MULTIPROCESS:
        ENGINE_QUEUE.set(_engine_queue_depth())


if not MULTIPROCESS:
    ENGINE_QUEUE.set_function(_engine_queue_depth)


# Exposition


def render(accept: str) -> tuple[bytes, str]:
    """The metrics in the format the Accept header asks for (Prometheus text by default), and
    its content type."""
    _refresh_engine_queue()
    encoder, content_type = choose_encoder(accept)
    if MULTIPROCESS:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type
