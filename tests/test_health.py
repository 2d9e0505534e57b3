"""The engines' is_ready(): what a readiness probe asks of the engine."""

import logging
import socket

import httpx

from conversations.llm.engine import Engine
from conversations.llm.remote import RemoteEngine


def free_port() -> int:
    """A local port where nothing listens (the system just handed it out and it was let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_remote_engine_whose_server_is_down_is_not_ready(caplog):
    engine = RemoteEngine(base_url=f"http://127.0.0.1:{free_port()}/v1")
    with caplog.at_level(logging.WARNING):
        assert engine.is_ready() is False  # (and does not raise)
    assert "could not be reached" in caplog.text


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


def test_the_embedded_engine_is_not_ready_before_loading_and_asking_loads_nothing(settings):
    engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE)
    try:
        assert engine.is_ready() is False
        assert engine.is_ready() is False
        assert not engine.is_loaded, "asking loads nothing"
    finally:
        engine.scheduler.stop()
