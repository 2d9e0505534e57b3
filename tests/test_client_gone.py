"""A client that goes away stops its reply, through the real server (gunicorn) and model: a
request answered in one piece (JSON) whose client hung up, and a stream whose socket closed
before its first event. The lease is long here, so only the fix can free the conversation."""

import json
import socket
import time

import pytest
import requests

from benchmarks.server import REQUEST_TIMEOUT, running
from tests.live_server import post_head

BOUND = 60  # seconds any one wait may take on a busy machine (no assertion on time)
LONG_REPLY = {"temperature": 2.0, "max_new_tokens": 1000}


@pytest.fixture(scope="module")
def server():
    with running(env={"CHATBOT_STALE_REPLY_SECONDS": "600"}) as bench:
        yield bench


def send_and_keep(server, path: str, body: dict, *, accept="application/json") -> socket.socket:
    """POST `body` on a raw connection and read nothing back."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=BOUND)
    sock.sendall(post_head(path, len(data), token=server.token, Accept=accept) + data)
    return sock


def last_reply(server, conversation) -> dict:
    response = requests.get(
        f"{server.url}/api/conversations/{conversation}/messages/",
        headers=server.headers,
        timeout=REQUEST_TIMEOUT,
    )
    replies = [m for m in response.json()["results"] if m["role"] == "assistant"]
    return replies[-1] if replies else {}


def ended(server, conversation) -> dict:
    """The conversation's last reply once it is no longer being written, else {}."""
    reply = last_reply(server, conversation)
    return reply if reply.get("status", "streaming") != "streaming" else {}


def wait_for(condition, what: str):
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {BOUND} s")


def ended_on_its_own(reply: dict) -> bool:
    """Sampling at temperature 2 may end a reply early (end of text) before the server could
    see its client leave: such a try shows nothing either way. A reply the server failed to
    stop runs to its full budget, so it never counts as this."""
    return reply["status"] == "ok" and reply["completion_tokens"] < LONG_REPLY["max_new_tokens"]


def after_hang_up(server, hang_up) -> dict:
    """Run `hang_up(conversation, path)` in a new conversation until a try's reply did not end
    on its own (three tries); return that reply once it has ended."""
    for _ in range(3):
        conversation = server.new_conversation(**LONG_REPLY)
        hang_up(conversation, f"/api/conversations/{conversation}/messages/")
        reply = wait_for(lambda c=conversation: ended(server, c), "the reply ended")
        if not ended_on_its_own(reply):
            return reply | {"conversation": conversation}
    raise AssertionError(f"three replies ended on their own before their clients left: {reply}")


def test_a_json_request_whose_client_hung_up_stops_its_reply(server):
    def hang_up(conversation, path):
        sock = send_and_keep(server, path, {"content": "Tell me a very long story about the sea."})
        wait_for(lambda: last_reply(server, conversation).get("content"), "the reply began")
        sock.close()

    reply = after_hang_up(server, hang_up)
    assert reply["status"] == "cancelled", reply
    assert reply["completion_tokens"] < LONG_REPLY["max_new_tokens"]
    assert reply["content"]  # what was written is kept


def test_a_stream_closed_before_its_first_event_frees_the_conversation(server):
    # A long reply: one the server failed to stop could not end before the check below (with
    # a short one, a busy machine could finish it before noticing the client had gone).
    def hang_up(conversation, path):
        send_and_keep(server, path, {"content": "Hi!"}, accept="text/event-stream").close()

    reply = after_hang_up(server, hang_up)
    conversation = reply["conversation"]
    path = f"/api/conversations/{conversation}/messages/"
    assert reply["status"] == "cancelled", reply
    assert (reply["completion_tokens"] or 0) < LONG_REPLY["max_new_tokens"]

    # The conversation is free: it takes the next message (a short reply, to be quick).
    shorter = requests.patch(
        f"{server.url}/api/conversations/{conversation}/",
        json={"max_new_tokens": 8},
        headers=server.headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert shorter.status_code == 200, shorter.text
    response = requests.post(
        f"{server.url}{path}",
        json={"content": "Are you there?"},
        headers=server.headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert response.status_code == 201, response.text
