"""The product scaled out: two gunicorn servers of it ("hosts" A and B, on two ports) sharing
one PostgreSQL database and one remote inference engine (`transformers serve` of the bundled
model), used through their HTTP APIs. A reply written through A is stopped through B; one
conversation posted to both at once is answered once; a reply whose host was killed is marked
interrupted through B once its lease runs out, and the conversation goes on through B.

PostgreSQL only (skipped on SQLite): the point is a database server shared by hosts. The test
database is the one pytest-django made; the tests commit what the hosts must see
(`transaction=True`), and a host's writes are read back through the other host's API.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from accounts.keys import issue_key
from conversations.llm.loading import prepare_bundled_model
from tests.factories import parse_block
from tests.inference_servers import InferenceServer, running_server, transformers_serve
from tests.live_server import Server, shared_database_url

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.inference_server,
    pytest.mark.django_db(transaction=True),
]

LEASE = 3.0  # seconds: a dead host's reply is freed this long after its last save
# At the highest temperature a conversation may have, the model all but never ends its turn
# early: this reply runs to its budget, far longer than the test takes to stop it.
LONG_REPLY = {"temperature": 2.0, "max_new_tokens": 400}
LONG_STORY = "Write a very long story about a lighthouse keeper, in many chapters."
LOGINS_PER_MINUTE = 4
TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # a reply may wait for the engine's one at a time


@pytest.fixture(scope="module")
def engine_server() -> Iterator[InferenceServer]:
    """One inference server for both hosts."""
    model_folder = prepare_bundled_model(settings.CHATBOT_MODEL_CACHE)
    with running_server(transformers_serve(model_folder)) as server:
        yield server


@pytest.fixture
def hosts(engine_server, tmp_path) -> Iterator[tuple[Server, Server]]:
    model_folder = prepare_bundled_model(settings.CHATBOT_MODEL_CACHE)
    env = {
        "DATABASE_URL": shared_database_url(),
        "CHATBOT_ENGINE_URL": engine_server.url,
        "CHATBOT_TOKENIZER": str(model_folder),
        "CHATBOT_ENGINE_READ_TIMEOUT": "300",
        "CHATBOT_STALE_REPLY_SECONDS": str(LEASE),
        "CHATBOT_MESSAGES_PER_MINUTE": "0",
        "CHATBOT_LOGINS_PER_MINUTE": str(LOGINS_PER_MINUTE),
    }
    pair = []
    for name in ("a", "b"):
        var_dir = tmp_path / name
        var_dir.mkdir()
        pair.append(Server(var_dir, env=env))
    a, b = pair
    a.manage("collectstatic", "--noinput")  # the pages a host answers when it is up need them
    try:
        for host in pair:
            host.start()
        yield a, b
    finally:
        for host in pair:
            host.stop()
        # Their connections closed: pytest-django may empty and later drop the database.


@pytest.fixture
def headers(transactional_db) -> dict[str, str]:
    """A user and API key, committed: both hosts see them."""
    user = get_user_model().objects.create_user("alice", password="correct-Horse-battery-9")
    _, key = issue_key(user=user, name="hosts")
    return {"Authorization": f"Token {key}"}


def new_conversation(host: Server, headers, **params) -> str:
    response = httpx.post(
        f"{host.url}/api/conversations/", json=params, headers=headers, timeout=TIMEOUT
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def messages_url(host: Server, conversation: str) -> str:
    return f"{host.url}/api/conversations/{conversation}/messages/"


def history(host: Server, headers, conversation: str) -> list[dict]:
    response = httpx.get(messages_url(host, conversation), headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["results"]


class Stream:
    """A reply streamed by a host as server-sent events, read one event at a time."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        self.events = self._events(response)

    @staticmethod
    def _events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
        buffer = ""
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                yield parse_block(block)

    def next(self, wanted: str) -> Any:
        for kind, data in self.events:
            if kind == wanted:
                return data
        raise AssertionError(f"the stream ended without a {wanted} event")


@contextmanager
def long_reply(host: Server, headers) -> Iterator[tuple[str, Stream, str]]:
    """A new conversation whose long reply `host` is streaming: its id, the stream and the
    first text written."""
    conversation = new_conversation(host, headers, **LONG_REPLY)
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream(
            "POST",
            messages_url(host, conversation),
            json={"content": LONG_STORY, "stream": True},
            headers=headers,
        ) as response,
    ):
        stream = Stream(response)
        yield conversation, stream, stream.next("delta")["text"]


def test_a_reply_written_through_one_host_is_stopped_through_the_other(hosts, headers):
    a, b = hosts
    with long_reply(a, headers) as (conversation, stream, written):
        stopped = httpx.post(
            f"{b.url}/api/conversations/{conversation}/stop/", headers=headers, timeout=TIMEOUT
        )
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["stopped"], "B saw no reply being written"
        done = stream.next("done")

    assert done["status"] == "cancelled"
    assert done["completion_tokens"] < LONG_REPLY["max_new_tokens"], "A went on writing"
    assert done["content"].startswith(written)
    saved = history(b, headers, conversation)[-1]
    assert saved["status"] == "cancelled"
    assert saved["content"] == done["content"], "the partial text is saved as streamed"


def test_one_conversation_posted_to_both_hosts_at_once_is_answered_once(hosts, headers):
    conversation = new_conversation(hosts[0], headers, temperature=2.0, max_new_tokens=64)
    start = threading.Barrier(2)
    responses: dict[str, httpx.Response] = {}

    def post(host: Server, content: str) -> None:
        start.wait()
        responses[content] = httpx.post(
            messages_url(host, conversation),
            json={"content": content},
            headers=headers,
            timeout=TIMEOUT,
        )

    threads = [
        threading.Thread(target=post, args=(host, f"Through host {name}: tell me a story."))
        for host, name in zip(hosts, "AB", strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    by_status = {
        response.status_code: (content, response) for content, response in responses.items()
    }
    assert sorted(by_status) == [201, 409], [r.text for r in responses.values()]
    answered, _ = by_status[201]
    assert by_status[201][1].json()["reply"]["status"] == "ok"
    assert "still being written" in by_status[409][1].json()["detail"]
    stored = history(hosts[1], headers, conversation)
    assert [(m["role"], m["status"]) for m in stored] == [("user", "ok"), ("assistant", "ok")]
    assert stored[0]["content"] == answered, "the refused message is not stored"


def test_a_reply_whose_host_was_killed_is_freed_through_the_other(hosts, headers):
    a, b = hosts
    with long_reply(a, headers) as (conversation, stream, written):
        # The conversation's later replies short: their text does not matter.
        shortened = httpx.patch(
            f"{b.url}/api/conversations/{conversation}/",
            json={"max_new_tokens": 8, "temperature": None},
            headers=headers,
            timeout=TIMEOUT,
        )
        assert shortened.status_code == 200, shortened.text
        a.kill()  # master and workers: no code of A's runs again
        killed_at = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            stream.next("done")  # the stream breaks off: A is gone

    # Within its lease (renewed every third of it until the kill), B takes the reply for one
    # still being written.
    while time.monotonic() - killed_at < LEASE / 2:
        reply = history(b, headers, conversation)[-1]
        assert reply["status"] == "streaming", "marked before its lease ran out"
        time.sleep(0.5)
    deadline = killed_at + LEASE + 30
    while (reply := history(b, headers, conversation)[-1])["status"] == "streaming":
        assert time.monotonic() < deadline, "the dead reply was never marked"
        time.sleep(0.5)
    assert reply["status"] == "interrupted"
    assert reply["content"].startswith(written), "the text written is kept"

    answered = httpx.post(
        messages_url(b, conversation),
        json={"content": "Are you still there?"},
        headers=headers,
        timeout=TIMEOUT,
    )
    assert answered.status_code == 201, answered.text
    assert answered.json()["reply"]["status"] == "ok"
    statuses = [m["status"] for m in history(b, headers, conversation)]
    assert statuses == ["ok", "interrupted", "ok", "ok"]


def test_the_rate_limits_hold_across_hosts(hosts, headers):
    """Sign-in attempts from one address, to one host and the other in turn: the limit holds
    for all of them together, not for each host."""
    statuses = [
        httpx.post(
            f"{host.url}/api/token/",
            json={"username": "alice", "password": "wrong"},
            timeout=TIMEOUT,
        ).status_code
        for host in hosts * LOGINS_PER_MINUTE
    ]
    assert statuses == [400] * LOGINS_PER_MINUTE + [429] * LOGINS_PER_MINUTE, statuses
