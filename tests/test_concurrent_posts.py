"""Requests at the same time, through the real server and model. Two messages posted to one
conversation at the same instant: the first is answered, the second gets 409 with a clear message
(the documented choice) and stores nothing; nothing is lost, nothing answered twice, never a 5xx
or "database is locked". A full batch of replies streaming: pages and stop are still answered."""

import threading
import time

import requests

from benchmarks.load import tally
from benchmarks.server import REQUEST_TIMEOUT, BenchServer, running

ROUNDS = 3


def test_two_messages_at_once_to_one_conversation():
    with BenchServer(env={"CHATBOT_MAX_NEW_TOKENS": "24"}) as server:
        server.prepare()
        server.start()
        conversation = server.new_conversation()
        url = f"{server.url}/api/conversations/{conversation}/messages/"
        accepted = []
        for round_ in range(ROUNDS):
            start = threading.Barrier(2)
            responses = {}

            def post(i, round_=round_, start=start, responses=responses):
                content = f"Round {round_}, message {i}: name a colour."
                start.wait()
                responses[content] = requests.post(
                    url, json={"content": content}, headers=server.headers, timeout=REQUEST_TIMEOUT
                )

            threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            statuses = sorted(r.status_code for r in responses.values())
            assert statuses in ([201, 201], [201, 409]), [r.text for r in responses.values()]
            for content, response in responses.items():
                if response.status_code == 409:
                    assert "still being written" in response.json()["detail"]
                else:
                    assert response.json()["reply"]["status"] == "ok"
                    accepted.append(content)
        stored = requests.get(url, headers=server.headers, timeout=REQUEST_TIMEOUT).json()
        log = server.server.log.read_text()

    messages = stored["results"]
    assert tally({conversation: accepted}, {conversation: messages}) == {
        "sent": len(accepted),
        "stored": len(accepted),
        "lost": 0,
        "duplicated": 0,
    }
    # Each question is followed by its own reply, in order, every reply finished.
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * len(accepted)
    for question, reply in zip(messages[::2], messages[1::2], strict=True):
        assert reply["reply_to"] == question["id"] and reply["status"] == "ok"
    assert "database is locked" not in log


def test_a_full_batch_of_streaming_replies_leaves_threads_for_pages_and_stop():
    """With as many replies streaming as the model writes at once, the server still answers
    other requests at once: a page of conversations, and a stop that ends one reply."""
    batch = 8  # CHATBOT_BATCH_SIZE's default
    with running(env={"CHATBOT_MAX_NEW_TOKENS": "400"}) as server:
        conversations = [server.new_conversation(max_new_tokens=400) for _ in range(batch)]
        streaming = threading.Barrier(batch + 1)
        ended: dict[str, tuple[float, str]] = {}

        def read(conversation):
            result = server.ask(
                conversation, "Write a very long story about the sea.", streaming.wait
            )
            ended[conversation] = (time.perf_counter(), result["status"])  # at the done event

        readers = [threading.Thread(target=read, args=(c,)) for c in conversations]
        for reader in readers:
            reader.start()
        streaming.wait(timeout=REQUEST_TIMEOUT)  # every reply is being written
        page = requests.get(
            f"{server.url}/api/conversations/", headers=server.headers, timeout=REQUEST_TIMEOUT
        )
        stop = requests.post(
            f"{server.url}/api/conversations/{conversations[0]}/stop/",
            headers=server.headers,
            timeout=REQUEST_TIMEOUT,
        )
        answered = time.perf_counter()
        for reader in readers:
            reader.join()

    assert page.status_code == 200 and page.json()["count"] == batch + 1
    assert stop.status_code == 200 and stop.json()["stopped"] is True
    assert ended[conversations[0]][1] == "cancelled"
    others = [ended[c] for c in conversations[1:]]
    assert all(status == "ok" for _, status in others)
    assert answered < min(at for at, _ in others), "both were answered while replies streamed"
