"""The health checks for load balancers (chatsite/health.py) and the engines' is_ready()."""

import logging
import socket
from unittest import mock

import httpx
import pytest
from django.db import OperationalError, connections
from django.test import Client

from conversations import runtime
from conversations.llm.engine import Engine
from conversations.llm.remote import RemoteEngine

CHECKS = ["/healthz", "/readyz"]


@pytest.fixture
def serving(db, fake_engine):
    """A process ready for traffic: its database answers and its engine (the fake) is ready."""
    return fake_engine


def plain(response) -> str:
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def test_healthz_answers_ok_without_touching_database_or_engine(client):
    # No `db` fixture: a query would fail the test; no engine is built either.
    with mock.patch("chatsite.health.get_engine", side_effect=AssertionError("engine touched")):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert plain(response) == "ok"


def test_readyz_answers_ready_when_database_and_engine_are(client, serving):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert plain(response) == "ready"


def test_readyz_answers_503_while_the_engine_is_not_ready(client, serving, caplog):
    serving.ready = False
    with caplog.at_level(logging.WARNING, logger="chatsite.health"):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert plain(response) == "not ready: engine"
    assert "FakeEngine" in caplog.text

    serving.ready = True
    assert client.get("/readyz").status_code == 200


def test_readyz_answers_503_when_the_database_does_not_answer(client, serving, caplog):
    failure = OperationalError("could not connect to server at db-7.internal:5432")
    with (
        mock.patch.object(connections["default"], "cursor", side_effect=failure),
        caplog.at_level(logging.WARNING, logger="chatsite.health"),
    ):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert plain(response) == "not ready: database"
    assert "db-7.internal" not in response.content.decode()
    assert "db-7.internal" in caplog.text, "the full reason is logged"


@pytest.mark.parametrize("url", CHECKS)
def test_checks_are_public_uncached_cookieless_and_read_only(client, serving, url):
    for _ in range(20):  # polled often, by anyone: never refused, redirected or rate-limited
        response = client.get(url)
        assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    assert not response.cookies
    assert "Set-Cookie" not in response.headers
    assert client.head(url).status_code == 200
    # A POST without a CSRF token gets 405, not the CSRF check's 403.
    checked = Client(enforce_csrf_checks=True)
    for method in (checked.post, checked.put, checked.delete, checked.options):
        refused = method(url)
        assert refused.status_code == 405
        assert "GET" in refused["Allow"]


@pytest.mark.parametrize("url", CHECKS)
def test_checks_answer_over_plain_http_when_https_is_enforced(client, serving, settings, url):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/accounts/login/").status_code == 301, "other pages are redirected"
    assert client.get(url).status_code == 200


def free_port() -> int:
    """A local port where nothing listens (the system just handed it out and it was let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_remote_engine_whose_server_is_down_is_not_ready(client, db, caplog):
    engine = RemoteEngine(base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert engine.is_ready() is False  # (and does not raise)

    previous = runtime.set_engine(engine)
    try:
        with caplog.at_level(logging.WARNING):
            response = client.get("/readyz")
    finally:
        runtime.set_engine(previous)
    assert response.status_code == 503
    assert plain(response) == "not ready: engine"
    assert "could not be reached" in caplog.text
    assert "127.0.0.1" not in response.content.decode()


def test_a_remote_engine_is_ready_when_its_server_lists_models_and_keeps_that_briefly():
    asked: list[str] = []
    status = 200

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(status, json={"data": [{"id": "served"}]})

    engine = RemoteEngine(base_url="http://inference.test/v1")
    engine.client.close()
    engine.client = httpx.Client(transport=httpx.MockTransport(server))
    assert engine.is_ready() is True
    assert engine.is_ready() is True
    assert asked == ["/v1/models"], "a success is kept: the second probe asked nothing"

    engine._ready_until = 0.0  # the success is stale
    status = 503
    assert engine.is_ready() is False
    assert engine.is_ready() is False
    assert len(asked) == 3, "a failure is not kept"


def test_the_embedded_engine_is_ready_once_loaded(default_engine):
    assert default_engine.is_ready() is True


def test_the_embedded_engine_is_not_ready_before_loading_and_asking_loads_nothing(
    client, serving, settings
):
    engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE)
    previous = runtime.set_engine(engine)
    try:
        assert engine.is_ready() is False
        response = client.get("/readyz")
        assert response.status_code == 503
        assert plain(response) == "not ready: engine"
        assert engine.is_ready() is False
        assert not engine.is_loaded, "readiness probes never load the model"
    finally:
        runtime.set_engine(previous)
        engine.scheduler.stop()
