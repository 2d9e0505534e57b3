"""Replies whose server dies, on real gunicorn servers with the bundled model: a worker killed
mid-reply (its master boots another), a whole server gone while another one on the same database
goes on, a worker frozen past its lease, and a live writer waiting long for the model.

Two servers share one SQLite database, as servers on several hosts share PostgreSQL. Leases are
short (LEASE seconds) so that nothing here waits the default 15 s.
"""

import json
import signal
import time

import psutil
import pytest
import requests

from tests.live_server import Server

pytestmark = pytest.mark.model

LEASE = 3.0
USERNAME, PASSWORD = "alice", "correct-Horse-battery-9"
# Sampled at the highest temperature a conversation may have, the model all but never ends its
# turn early, so these replies run to their budget (several seconds) on any CPU.
LONG_REPLY = {"temperature": 2.0, "max_new_tokens": 800}
# A reply that must outlast several leases: 800 tokens take under 6 s on a fast CPU.
LONGEST_REPLY = {"temperature": 2.0, "max_new_tokens": 4096}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Server A writes one reply at a time (so a second one waits); B shares its database."""
    var_dir = tmp_path_factory.mktemp("recovery")
    common = {
        "CHATBOT_STALE_REPLY_SECONDS": str(LEASE),
        "CHATBOT_MESSAGES_PER_MINUTE": "0",
        "CHATBOT_MAX_NEW_TOKENS_LIMIT": str(LONGEST_REPLY["max_new_tokens"]),
    }
    a = Server(var_dir, env={**common, "CHATBOT_BATCH_SIZE": "1", "CHATBOT_WEB_THREADS": "8"})
    b = Server(var_dir, env=common)
    b.log = var_dir / "server-b.log"
    a.prepare()
    a.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        f"User.objects.create_user({USERNAME!r}, password={PASSWORD!r})",
    )
    a.start()
    b.start()
    token = requests.post(
        f"{a.url}/api/token/", json={"username": USERNAME, "password": PASSWORD}, timeout=10
    ).json()["token"]
    yield a, b, {"Authorization": f"Token {token}"}
    for server in (a, b):
        server.stop()


def new_conversation(server, headers, **params) -> str:
    response = requests.post(
        f"{server.url}/api/conversations/", json=params, headers=headers, timeout=10
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def messages_url(server, conversation: str) -> str:
    return f"{server.url}/api/conversations/{conversation}/messages/"


class Stream:
    """A reply streamed as Server-Sent Events, read one event at a time."""

    def __init__(self, response: requests.Response) -> None:
        assert response.status_code == 200, response.text
        self.response = response
        self.events = self._events()

    @classmethod
    def post(cls, server, headers, conversation: str, content: str) -> "Stream":
        return cls(
            requests.post(
                messages_url(server, conversation),
                json={"content": content, "stream": True},
                headers=headers,
                stream=True,
                timeout=300,
            )
        )

    def _events(self):
        kind = None
        for line in self.response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])

    def next(self, wanted: str) -> dict:
        """The data of the next event of this kind."""
        for kind, data in self.events:
            if kind == wanted:
                return data
        raise AssertionError(f"the stream ended without a {wanted} event")

    def first_delta(self) -> str:
        return self.next("delta")["text"]

    def close(self) -> None:
        self.response.close()


def last_reply(server, headers, conversation: str) -> dict:
    response = requests.get(messages_url(server, conversation), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["results"][-1]


def shorten_replies(server, headers, conversation: str) -> None:
    """Later replies short (the running one keeps its parameters): their text does not matter."""
    short = {"max_new_tokens": 8, "temperature": None}
    response = requests.patch(
        f"{server.url}/api/conversations/{conversation}/", json=short, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text


def post_until_accepted(server, headers, conversation: str, *, within: float) -> float:
    """Post a message every half second until the conversation takes it; the seconds until it
    did (its `user_message` event: the reply to it may still wait for a model loading). Until
    the dead reply's lease runs out, each try is refused as busy (409)."""
    started = time.monotonic()
    while True:
        response = requests.post(
            messages_url(server, conversation),
            json={"content": "Are you still there?", "stream": True},
            headers=headers,
            stream=True,
            timeout=300,
        )
        if response.status_code == 200:
            stream = Stream(response)
            stream.next("user_message")
            accepted = time.monotonic() - started
            assert stream.next("done")["status"] == "ok"
            return accepted
        assert response.status_code == 409, response.text
        assert time.monotonic() - started < within, f"still refused: {response.text}"
        time.sleep(0.5)


def worker_of(server) -> psutil.Process:
    (worker,) = psutil.Process(server.process.pid).children()
    return worker


def test_a_worker_killed_mid_reply_frees_its_conversation(servers):
    a, _, headers = servers
    conversation = new_conversation(a, headers, **LONG_REPLY)
    worker = worker_of(a)

    stream = Stream.post(a, headers, conversation, "Tell me a long story about the sea.")
    written = stream.first_delta()
    shorten_replies(a, headers, conversation)
    worker.send_signal(signal.SIGKILL)  # as the kernel's OOM killer would; the master lives on
    stream.close()

    # The master boots a new worker, which runs no start-up code of the master's: the dead
    # reply's lease alone frees the conversation.
    took = post_until_accepted(a, headers, conversation, within=LEASE + 60)
    assert worker_of(a).pid != worker.pid
    replies = [
        m
        for m in requests.get(messages_url(a, conversation), headers=headers, timeout=10).json()[
            "results"
        ]
        if m["role"] == "assistant"
    ]
    killed = replies[0]
    assert killed["status"] == "interrupted"
    assert killed["content"].lstrip().startswith(written.strip()), "the text written is kept"
    print(f"conversation took a message {took:.1f} s after the kill (lease {LEASE} s)")


def test_a_live_writer_waiting_for_the_model_keeps_its_lease(servers):
    """On A, one reply at a time: a second conversation's reply waits, writing nothing, while
    the first runs for several leases. Neither is taken for dead."""
    a, b, headers = servers
    first = new_conversation(a, headers, **LONGEST_REPLY)
    second = new_conversation(a, headers, max_new_tokens=8)
    running = Stream.post(a, headers, first, "Tell me a long story about the mountains.")
    running.first_delta()
    posted = time.monotonic()
    waiting = Stream.post(a, headers, second, "Hello!")

    # Looking at both conversations through the other server marks a reply whose lease ran out.
    seen = set()
    for _ in range(int(3 * LEASE / 0.5)):
        for conversation in (first, second):
            seen.add(last_reply(b, headers, conversation)["status"])
        time.sleep(0.5)
    stopped = requests.post(
        f"{a.url}/api/conversations/{first}/stop/", headers=headers, timeout=60
    ).json()
    waiting.first_delta()
    waited = time.monotonic() - posted
    done = waiting.next("done")
    running.close()

    assert "interrupted" not in seen, "a reply whose writer lives was taken for dead"
    assert stopped["stopped"], "the first reply ran to its end before the other waited long"
    assert done["status"] == "ok"
    assert waited > 1.5 * LEASE, "the reply did not wait long enough to test this"


def test_a_frozen_worker_finds_its_reply_interrupted_and_stops(servers):
    """A worker that stands still past its lease (a long pause, a frozen disk): the other
    server frees the conversation, and the writer, when it wakes, writes no more."""
    a, b, headers = servers
    conversation = new_conversation(a, headers, **LONG_REPLY)
    stream = Stream.post(a, headers, conversation, "Tell me a long story about a forest.")
    stream.first_delta()
    shorten_replies(a, headers, conversation)
    worker = worker_of(a)

    worker.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + LEASE + 30
        while last_reply(b, headers, conversation)["status"] == "streaming":
            assert time.monotonic() < deadline, "the frozen reply was never marked"
            time.sleep(0.25)
        marked = last_reply(b, headers, conversation)
    finally:
        worker.send_signal(signal.SIGCONT)

    done = stream.next("done")
    assert marked["status"] == done["status"] == "interrupted"
    assert done["content"].startswith(marked["content"])
    assert done["generation_params"]["finish_reason"] == "cancelled", "the writer went on"
    assert done["completion_tokens"] < LONG_REPLY["max_new_tokens"]
    post_until_accepted(b, headers, conversation, within=60)


def test_a_server_that_died_frees_its_conversation_on_another_server(servers):
    a, b, headers = servers
    conversation = new_conversation(a, headers, **LONG_REPLY)
    stream = Stream.post(a, headers, conversation, "Tell me a long story about a river.")
    written = stream.first_delta()
    shorten_replies(a, headers, conversation)

    a.kill()  # master and worker: no code of A's runs again
    stream.close()

    took = post_until_accepted(b, headers, conversation, within=LEASE + 30)
    print(f"the other server took a message {took:.1f} s after the kill (lease {LEASE} s)")
    history = requests.get(messages_url(b, conversation), headers=headers, timeout=10).json()[
        "results"
    ]
    assert [m["status"] for m in history] == ["ok", "interrupted", "ok", "ok"]
    assert history[1]["content"].lstrip().startswith(written.strip())
