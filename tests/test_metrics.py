"""GET /metrics for Prometheus (chatsite/metrics.py) and what it counts (conversations/metrics.py):
off by default, the bearer token, replies by status and their timings, HTTP requests by route,
the gauges, and the workers' figures added up in multiprocess mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from conversations.llm.engine import Engine, ReplyStream
from conversations.llm.interface import GenerationParams
from conversations.llm.remote import RemoteEngine
from conversations.models import Message
from tests.factories import (
    SCRIPTED,
    EventReader,
    close_stream,
    make_conversation,
    stream_post,
    url,
)

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-scrape-token"


@pytest.fixture
def metrics_on(settings):
    settings.CHATBOT_METRICS = True
    settings.CHATBOT_METRICS_TOKEN = ""
    return settings


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def post_message(api, path="/api/messages/", content="Hello there"):
    response = api.post(path, {"content": content}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def reply_under_way(api, owner, fake_engine):
    """A conversation whose reply streams, its first piece read: with the response and its
    reader."""
    conversation = make_conversation(owner, "Chat")
    fake_engine.replies = [SCRIPTED]
    response = stream_post(api, url(conversation), {"content": "Count"})
    reader = EventReader(response)
    reader.until("delta")
    return conversation, response, reader


# --- the endpoint --------------------------------------------------------------------------------


def test_metrics_are_off_by_default(client, settings):
    assert settings.CHATBOT_METRICS is False
    assert client.get("/metrics").status_code == 404


def test_metrics_on_answer_the_prometheus_text_format_never_cached(client, metrics_on):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert "no-store" in response["Cache-Control"]
    assert not response.cookies
    names = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert {
        "chatbot_http_requests",
        "chatbot_http_request_duration_seconds",
        "chatbot_replies",
        "chatbot_reply_ttft_seconds",
        "chatbot_reply_tokens_per_second",
        "chatbot_streams_in_flight",
        "chatbot_engine_queue_depth",
    } <= names
    assert client.post("/metrics").status_code == 405


def test_a_token_when_set_is_required_as_a_bearer_token(client, metrics_on):
    metrics_on.CHATBOT_METRICS_TOKEN = TOKEN

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Token {TOKEN}"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.content == b"unauthorized"
        assert response["WWW-Authenticate"].startswith("Bearer")
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert b"chatbot_replies_total" in response.content


# --- replies and requests ------------------------------------------------------------------------


def test_a_posted_message_moves_its_reply_request_and_timing_counts_by_one(
    api, client, fake_engine, metrics_on
):
    before = scrape(client)

    body = post_message(api)

    after = scrape(client)
    assert body["reply"]["status"] == "ok"
    assert moved(before, after, "chatbot_replies_total", status="ok") == 1
    for status in ("cancelled", "error", "interrupted"):
        assert moved(before, after, "chatbot_replies_total", status=status) == 0
    assert (
        moved(
            before,
            after,
            "chatbot_http_requests_total",
            method="POST",
            route="api/messages/",
            status="201",
        )
        == 1
    )
    assert (
        moved(
            before,
            after,
            "chatbot_http_request_duration_seconds_count",
            method="POST",
            route="api/messages/",
        )
        == 1
    )
    assert moved(before, after, "chatbot_reply_ttft_seconds_count") == 1
    # The fake's first word comes at 5 ms, the reply ends at 20.
    assert moved(before, after, "chatbot_reply_ttft_seconds_sum") == pytest.approx(0.005)
    assert moved(before, after, "chatbot_reply_tokens_per_second_count") == 1
    words = len(body["reply"]["content"].split())
    assert moved(before, after, "chatbot_reply_tokens_per_second_sum") == pytest.approx(
        (words - 1) / 0.015
    )
    assert value(after, "chatbot_streams_in_flight") == 0
    assert value(after, "chatbot_engine_queue_depth") == 0
    # Scrapes are not counted.
    assert not any(
        name == "chatbot_http_requests_total" and ("route", "metrics") in labels
        for name, labels in after
    )


def test_a_failed_reply_counts_as_error_without_timings(api, client, fake_engine, metrics_on):
    fake_engine.fail_with = RuntimeError("boom")
    fake_engine.fail_after = 2
    before = scrape(client)

    response = api.post("/api/messages/", {"content": "Tell me a story"}, format="json")

    after = scrape(client)
    assert response.status_code == 503
    assert moved(before, after, "chatbot_replies_total", status="error") == 1
    assert moved(before, after, "chatbot_replies_total", status="ok") == 0
    assert moved(before, after, "chatbot_reply_ttft_seconds_count") == 0
    route = {"method": "POST", "route": "api/messages/", "status": "503"}
    assert moved(before, after, "chatbot_http_requests_total", **route) == 1
    assert value(after, "chatbot_streams_in_flight") == 0


def test_a_reply_whose_stream_is_closed_counts_as_cancelled(
    api, owner, client, fake_engine, metrics_on
):
    before = scrape(client)

    conversation, response, _ = reply_under_way(api, owner, fake_engine)
    during = scrape(client)
    close_stream(response)

    after = scrape(client)
    assert conversation.messages.get(role="assistant").status == Message.Status.CANCELLED
    assert value(during, "chatbot_streams_in_flight") == 1
    assert value(during, "chatbot_engine_queue_depth") == 1
    assert moved(before, after, "chatbot_replies_total", status="cancelled") == 1
    assert moved(before, after, "chatbot_replies_total", status="ok") == 0
    # It wrote a first token: its time counts.
    assert moved(before, after, "chatbot_reply_ttft_seconds_count") == 1
    assert value(after, "chatbot_streams_in_flight") == 0
    assert value(after, "chatbot_engine_queue_depth") == 0


def test_a_reply_given_up_for_dead_meanwhile_counts_as_interrupted(
    api, owner, client, fake_engine, metrics_on
):
    before = scrape(client)
    conversation, _, reader = reply_under_way(api, owner, fake_engine)

    conversation.messages.filter(role="assistant").update(status=Message.Status.INTERRUPTED)
    reader.rest()

    after = scrape(client)
    assert moved(before, after, "chatbot_replies_total", status="interrupted") == 1
    assert moved(before, after, "chatbot_replies_total", status="ok") == 0
    assert value(after, "chatbot_streams_in_flight") == 0


def test_route_labels_are_url_patterns_never_ids(api, owner, client, fake_engine, metrics_on):
    conversation = make_conversation(owner, "Chat")

    post_message(api, url(conversation))
    assert api.get(f"/api/conversations/{conversation.pk}/").status_code == 200
    assert client.get("/no/such/page/12345").status_code == 404

    text = client.get("/metrics").content.decode()
    assert str(conversation.pk) not in text
    assert "12345" not in text
    routes = {
        labels["route"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if (labels := sample.labels).get("route")
    }
    assert {
        "api/conversations/<pk>/messages/",  # DRF's router: a regular expression
        "api/conversations/<pk>/",
        "<unmatched>",
    } <= routes


def test_nothing_is_counted_while_metrics_are_off(api, client, fake_engine, metrics_on):
    before = scrape(client)
    metrics_on.CHATBOT_METRICS = False

    post_message(api)

    metrics_on.CHATBOT_METRICS = True
    after = scrape(client)
    assert moved(before, after, "chatbot_replies_total", status="ok") == 0
    route = {"method": "POST", "route": "api/messages/", "status": "201"}
    assert moved(before, after, "chatbot_http_requests_total", **route) == 0


# --- several worker processes --------------------------------------------------------------------


def run_python(code: str, **env) -> str:
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatsite.settings", **env}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_multiprocess_mode_adds_up_every_workers_figures(tmp_path):
    """Two processes count a reply each; a third, scraping, sees both. A dead process's
    streams in flight stop counting once it is marked dead (gunicorn.conf.py's child_exit)."""
    env = {"CHATBOT_METRICS": "true", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    count = (
        "import django; django.setup(); from conversations import metrics; "
        "metrics.reply_ended('ok'); metrics.STREAMS_IN_FLIGHT.inc(); "
        "import os; print(os.getpid())"
    )
    pids = [run_python(count, **env).strip() for _ in range(2)]
    show = (
        "import django, sys; django.setup(); from prometheus_client import multiprocess; "
        "from conversations import metrics; "
        "[multiprocess.mark_process_dead(int(pid)) for pid in sys.argv[1:]]; "
        "sys.stdout.write(metrics.render('')[0].decode())"
    )

    text = run_python(show.replace("sys.argv[1:]", "[]"), **env)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    replies = {s.labels["status"]: s.value for s in families["chatbot_replies"].samples}
    assert replies["ok"] == 2
    assert families["chatbot_streams_in_flight"].samples[0].value == 2

    text = run_python(show.replace("sys.argv[1:]", repr(pids)), **env)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    replies = {s.labels["status"]: s.value for s in families["chatbot_replies"].samples}
    assert replies["ok"] == 2  # counts stay
    assert families["chatbot_streams_in_flight"].samples[0].value == 0


def test_gunicorn_config_makes_a_metrics_folder_per_start_and_removes_it(tmp_path):
    code = (
        "import os, runpy; runpy.run_path('chatsite/gunicorn.conf.py'); "
        "print(os.environ.get('PROMETHEUS_MULTIPROC_DIR', ''))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT)

    def start(**extra) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()

    assert start(CHATBOT_METRICS="false") == ""
    folder = start(CHATBOT_METRICS="true")
    assert folder and "chatbot-metrics-" in folder
    assert not Path(folder).exists()  # removed when the server stopped
    assert start(CHATBOT_METRICS="true", PROMETHEUS_MULTIPROC_DIR=str(tmp_path)) == str(tmp_path)
    assert tmp_path.exists()


# --- the engines' queue depth --------------------------------------------------------------------


def test_the_embedded_engine_counts_the_streams_being_read_without_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(ReplyStream, "_pieces", lambda self: iter(["a", "b"]))
    engine = Engine(cache_dir=tmp_path)
    try:
        assert engine.queue_depth() == 0
        pieces = iter(engine.stream([{"role": "user", "content": "Hi"}], GenerationParams()))
        assert next(pieces) == "a"
        assert engine.queue_depth() == 1
        assert list(pieces) == ["b"]
        assert engine.queue_depth() == 0
        assert not engine.is_loaded
    finally:
        engine.scheduler.stop()


def test_the_remote_engine_counts_the_replies_in_flight_to_its_server():
    chunks = [
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    stream = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, text=stream, headers={"Content-Type": "text/event-stream"})
        return httpx.Response(404, json={"detail": "Not Found"})

    engine = RemoteEngine(base_url="http://inference.test/v1", model="m")
    engine.client = httpx.Client(transport=httpx.MockTransport(server))
    pieces = iter(engine.stream([{"role": "user", "content": "Hi"}], GenerationParams()))

    assert engine.queue_depth() == 0
    assert next(pieces) == "Hel"
    assert engine.queue_depth() == 1
    assert list(pieces) == ["lo"]
    assert engine.queue_depth() == 0
