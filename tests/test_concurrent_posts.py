"""Two messages posted to one conversation at the same instant, through the real server and
model: the first is answered, the second gets 409 with a clear message (the documented choice)
and stores nothing; nothing is lost, nothing answered twice, never a 5xx or "database is
locked"."""

import threading

import requests

from benchmarks.load import tally
from benchmarks.server import REQUEST_TIMEOUT, BenchServer

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
