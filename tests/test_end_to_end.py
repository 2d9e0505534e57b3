"""The product as a user runs it: gunicorn serving the real bundled model over HTTP, a SQLite
database on disk, and a restart in the middle of a conversation."""

import json
import re
import time

import pytest
import requests

from tests.live_server import Server

pytestmark = pytest.mark.model

USERNAME, PASSWORD = "alice", "correct-Horse-battery-9"
LEASE = 2  # seconds: a reply whose server was killed is free again soon after


@pytest.fixture
def server(tmp_path):
    # A short lease, so a reply whose server was killed is free again within seconds.
    server = Server(tmp_path, env={"CHATBOT_STALE_REPLY_SECONDS": str(LEASE)})
    server.prepare()
    server.start()
    yield server
    server.stop()


def test_api_chat_survives_a_restart(server):
    token = requests.post(
        f"{server.url}/api/token/", json={"username": USERNAME, "password": PASSWORD}, timeout=10
    )
    assert token.status_code == 400  # no such user yet
    headers = _token_headers(server)

    first = _send(f"{server.url}/api/messages/", "What is the capital of France?", headers)
    assert first.status_code == 201, first.text
    body = first.json()
    assert "Paris" in body["reply"]["content"]
    assert body["reply"]["model"] == "SmolLM2-135M-Instruct"
    assert body["reply"]["context_turns"] == 0
    assert body["reply"]["completion_tokens"] > 0
    conversation = body["conversation"]

    messages_url = f"{server.url}/api/conversations/{conversation}/messages/"
    second = _send(messages_url, "And what is the capital of Germany?", headers)
    assert second.status_code == 201, second.text
    assert second.json()["reply"]["context_turns"] == 2

    # Close everything and come back.
    server.stop()
    server.start()

    history = requests.get(messages_url, headers=headers, timeout=10)
    assert history.status_code == 200
    contents = [m["content"] for m in history.json()["results"]]
    assert contents[0] == "What is the capital of France?"
    assert contents[2] == "And what is the capital of Germany?"
    assert len(contents) == 4

    third = _send(messages_url, "Thank you!", headers)
    assert third.status_code == 201, third.text
    assert third.json()["reply"]["context_turns"] == 4, "the restarted server rebuilt the context"


def test_a_person_signs_up_and_chats_in_the_browser_pages(server):
    browser = requests.Session()
    signup = browser.get(f"{server.url}/accounts/signup/", timeout=10)
    assert signup.status_code == 200
    page = browser.post(
        f"{server.url}/accounts/signup/",
        data={
            "username": "bob",
            "password1": PASSWORD,
            "password2": PASSWORD,
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
        },
        headers={"Referer": f"{server.url}/accounts/signup/"},
        timeout=10,
    )
    assert page.status_code == 200 and "New chat" in page.text

    thread = browser.post(
        f"{server.url}/new/",
        data={
            "content": "What is the capital of France?",
            "system_prompt": "",
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
        },
        headers={"Referer": f"{server.url}/"},
        timeout=300,
    )
    assert thread.status_code == 200
    assert re.search(r"/c/[0-9a-f-]{36}/", thread.url)
    assert "What is the capital of France?" in thread.text
    assert "Paris" in thread.text
    # Static files are served by the product itself (WhiteNoise), with no CDN.
    css = re.search(r'href="(/static/[^"]+\.css)"', thread.text).group(1)
    assert browser.get(f"{server.url}{css}", timeout=10).status_code == 200
    assert "https://" not in thread.text

    # The model named the chat after the first exchange; the list shows that name.
    title = re.search(r'<h1 id="thread-title">([^<]+)</h1>', thread.text).group(1)
    assert title.strip()
    assert len(title.split()) <= 8
    listing = browser.get(f"{server.url}/", timeout=10)
    assert title in listing.text
    assert "2 messages" in listing.text


def _create_user_code() -> str:
    return (
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({USERNAME!r}, password={PASSWORD!r})"
    )


def _token_headers(server) -> dict:
    server.manage("shell", "-c", _create_user_code())
    token = requests.post(
        f"{server.url}/api/token/", json={"username": USERNAME, "password": PASSWORD}, timeout=10
    )
    return {"Authorization": f"Token {token.json()['token']}"}


def _send(url, content, headers):
    """POST a message and wait for the whole reply (the model on a slow CPU takes a while)."""
    return requests.post(url, json={"content": content}, headers=headers, timeout=300)


def _events(response):
    """(event, data) pairs of a Server-Sent Events response, as they arrive."""
    kind = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


def test_replies_stream_token_by_token_and_a_killed_server_leaves_no_reply_streaming(server):
    headers = _token_headers(server)
    conversation = requests.post(
        f"{server.url}/api/conversations/",
        json={"max_new_tokens": 200},
        headers=headers,
        timeout=10,
    ).json()["id"]
    messages_url = f"{server.url}/api/conversations/{conversation}/messages/"

    # A streamed reply arrives in pieces over time, and ends with the saved reply.
    with requests.post(
        messages_url,
        json={"content": "What is the capital of France?"},
        headers={**headers, "Accept": "text/event-stream"},
        stream=True,
        timeout=300,
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        arrivals, pieces, done = [], [], None
        for kind, data in _events(response):
            if kind == "delta":
                arrivals.append(time.monotonic())
                pieces.append(data["text"])
            elif kind == "done":
                done, done_at = data, time.monotonic()
    assert "Paris" in done["content"]
    assert "".join(pieces).strip() == done["content"]
    assert done["status"] == "ok"
    # Pieces go out as the model writes them: the first came before the model wrote the rest,
    # which took it a while by its own measure (a faster CPU shortens both sides); a reply sent
    # whole would bring its first piece with the end. ("Paris" and the end of its turn: two
    # tokens at the least.)
    assert done["completion_tokens"] >= 2
    writing = (done["total_ms"] - done["ttft_ms"]) / 1000
    assert done_at - arrivals[0] > writing / 2, (done_at - arrivals[0], writing)

    # Kill the server in the middle of a long reply.
    response = requests.post(
        messages_url,
        json={"content": "Write a long story about a lighthouse keeper.", "stream": True},
        headers=headers,
        stream=True,
        timeout=300,
    )
    seen = 0
    for kind, _ in _events(response):
        seen += kind == "delta"
        if seen == 5:
            # Kill with the stream open (closing it would stop the reply as "cancelled"). The
            # partial text is saved: the writer saves a reply's first piece before sending it.
            # (No waiting: on a fast CPU the reply would be finished.)
            server.kill()
            break
    response.close()
    server.start()

    # The restarted server may answer before the dead reply's lease (LEASE s) has run out:
    # until then the reply reads streaming, and the first look after it marks it interrupted.
    deadline = time.monotonic() + LEASE + 30
    while True:
        history = requests.get(
            messages_url, params={"include": "all"}, headers=headers, timeout=10
        ).json()["results"]
        if history[-1]["status"] != "streaming" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    statuses = [m["status"] for m in history]
    assert "streaming" not in statuses
    assert statuses[-1] == "interrupted"
    assert history[-2]["content"] == "Write a long story about a lighthouse keeper."
    assert history[-1]["content"], "the text written before the crash is kept"

    # Chatting goes on, and the partial reply is part of the conversation.
    follow_up = _send(messages_url, "Thanks!", headers)
    assert follow_up.status_code == 201, follow_up.text
    assert follow_up.json()["reply"]["context_turns"] == 4
