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


def wait_for(condition, what: str):
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {BOUND} s")


def test_a_json_request_whose_client_hung_up_stops_its_reply(server):
    conversation = server.new_conversation(**LONG_REPLY)
    path = f"/api/conversations/{conversation}/messages/"
    sock = send_and_keep(server, path, {"content": "Tell me a very long story about the sea."})
    wait_for(lambda: last_reply(server, conversation).get("content"), "the reply began")

    sock.close()

    reply = wait_for(
        lambda: (r := last_reply(server, conversation))["status"] != "streaming" and r,
        "the reply ended",
    )
    assert reply["status"] == "cancelled", reply
    assert reply["completion_tokens"] < LONG_REPLY["max_new_tokens"]
    assert reply["content"]  # what was written is kept


def test_a_stream_closed_before_its_first_event_frees_the_conversation(server):
    # A long reply: one the server failed to stop could not end before the check below (with
    # a short one, a busy machine could finish it before noticing the client had gone).
    conversation = server.new_conversation(**LONG_REPLY)
    path = f"/api/conversations/{conversation}/messages/"

    send_and_keep(server, path, {"content": "Hi!"}, accept="text/event-stream").close()

    reply = wait_for(
        lambda: (
            (r := last_reply(server, conversation)).get("status", "streaming") != "streaming" and r
        ),
        "the reply ended",
    )
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
