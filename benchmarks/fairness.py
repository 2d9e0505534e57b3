"""One user floods the model; how long does another user wait for a first token?

Through the real server and model. Bob opens FLOOD streams at once, each asking for the longest
reply the server allows (CHATBOT_MAX_NEW_TOKENS_LIMIT) at temperature 2.0 (so it does not end
early); once Bob's accepted replies are being written, Alice asks a short question in her own
conversation. Her time to first token (as her client sees it) is measured alone and under the
flood, with the default settings: CHATBOT_REPLIES_PER_USER=2, so Bob's other streams get 429.
(With no per-user cap Bob could fill the whole batch, and Alice would wait for one of his
replies to end — bounded by the ceiling, minutes on a small CPU — before the scheduler lets her
in ahead of his waiting ones: tests/test_fairness.py checks that order.) Bob's streams are
closed after each measure, which cancels their replies. A first round is not counted: new
sizes of steps build their kernels the first time.
"""

from __future__ import annotations

import statistics
import threading
import time

import requests

from .report import Report, fmt
from .server import REQUEST_TIMEOUT, BenchServer

KEY = "fairness"
FLOOD = 8  # CHATBOT_BATCH_SIZE's default
ROUNDS = 3
QUESTION = "What is the capital of France? Answer in one sentence."
QUESTION_TOKENS = 64
FLOOD_REPLY = {"max_new_tokens": 1024, "temperature": 2.0}  # the default ceiling
FLOOD_PROMPT = "Write a very long story about the sea."


def run(report: Report, quick: bool) -> None:
    report.section(KEY, "Another user's first token while one user floods the model")
    rounds = 1 if quick else ROUNDS
    capped = _scenario({"CHATBOT_REPLIES_PER_USER": "2"}, rounds)

    report.row(KEY, "Alice alone", f"{fmt(capped['alone_s'], 3)} s", "time to first token")
    report.row(
        KEY,
        f"Alice while Bob opens {FLOOD} long streams (defaults: 2 replies per user)",
        f"{fmt(capped['flooded_s'], 3)} s",
        f"Bob: {capped['accepted']} accepted, {capped['refused']} refused (429)",
    )
    report.sections[KEY].data.update({"capped": capped, "rounds": rounds})
    report.target(
        "Another user's first token while one user floods (default settings)",
        "<= 1 s",
        f"{fmt(capped['flooded_s'], 3)} s (alone {fmt(capped['alone_s'], 3)} s)",
        capped["flooded_s"] <= 1.0,
    )


def _scenario(env: dict[str, str], rounds: int) -> dict:
    """Alice's time to first token alone and under Bob's flood (medians of `rounds`)."""
    alone, flooded, outcomes = [], [], []
    with BenchServer(env=env) as server:
        server.prepare()
        server.start()
        server.warm_up()
        alice = server.add_user("alice")
        # One round first, not counted: the first steps of new sizes build their kernels.
        for counted in [False] + [True] * rounds:
            first = _alice_asks(server, alice)
            with _Flood(server) as flood:
                second = _alice_asks(server, alice)
            if counted:
                alone.append(first)
                flooded.append(second)
                outcomes.append(flood.statuses)
                print(f"  alone {first:.3f} s, flooded {second:.3f} s")
    last = outcomes[-1]
    return {
        "alone_s": statistics.median(alone),
        "flooded_s": statistics.median(flooded),
        "alone_runs": alone,
        "flooded_runs": flooded,
        "accepted": last.count(200),
        "refused": last.count(429),
    }


def _alice_asks(server: BenchServer, alice: dict[str, str]) -> float:
    conversation = server.new_conversation(headers=alice, max_new_tokens=QUESTION_TOKENS)
    return server.ask(conversation, QUESTION, headers=alice)["ttft_s"]


class _Flood:
    """Bob's streams, open until the block ends; entered once every accepted one is writing."""

    def __init__(self, server: BenchServer) -> None:
        self.server = server
        self.statuses: list[int] = []
        self.done = threading.Event()
        self.ready = threading.Semaphore(0)
        self.threads: list[threading.Thread] = []
        self.conversations: list[str] = []

    def __enter__(self) -> _Flood:
        self.conversations = [self.server.new_conversation(**FLOOD_REPLY) for _ in range(FLOOD)]
        for conversation in self.conversations:
            thread = threading.Thread(target=self._stream, args=(conversation,), daemon=True)
            thread.start()
            self.threads.append(thread)
        for _ in self.conversations:  # every stream refused or writing
            if not self.ready.acquire(timeout=REQUEST_TIMEOUT):
                raise RuntimeError("Bob's streams did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=REQUEST_TIMEOUT)
        # The next measure starts once the server has stopped Bob's replies.
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while any(self._writing(c) for c in self.conversations):
            if time.monotonic() > deadline:
                raise RuntimeError("Bob's replies did not stop")
            time.sleep(0.2)

    def _writing(self, conversation: str) -> bool:
        response = requests.get(
            f"{self.server.url}/api/conversations/{conversation}/messages/",
            headers=self.server.headers,
            timeout=REQUEST_TIMEOUT,
        )
        return any(m["status"] == "streaming" for m in response.json()["results"])

    def _stream(self, conversation: str) -> None:
        signalled = False
        try:
            with requests.post(
                f"{self.server.url}/api/conversations/{conversation}/messages/",
                json={"content": FLOOD_PROMPT},
                headers={**self.server.headers, "Accept": "text/event-stream"},
                stream=True,
                timeout=REQUEST_TIMEOUT,
            ) as response:
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    return
                for line in response.iter_lines(decode_unicode=True):
                    if not signalled and line.startswith("event: delta"):
                        signalled = True
                        self.ready.release()
                    if self.done.is_set() or line.startswith("event: done"):
                        return  # closing the stream cancels the reply
        finally:
            if not signalled:
                self.ready.release()
