"""A bounded load run against the real server and the real model, on loopback only:

    python -m benchmarks.load [--clients 16] [--messages 3] [--tokens 16]

Each client has a conversation of its own and posts its messages one after another through the
API (streamed replies); all clients start together. Afterwards every conversation is read back
from the API and compared with what was sent. Prints: requests, server errors (5xx), p50/p95
latency, user messages stored vs sent, duplicated or missing messages, replies that did not end
"ok". Exits 1 when anything was lost, duplicated or answered with a 5xx: the target is zero.
Figures, not timing assertions: latency is reported, never judged.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time

import requests

from . import common
from .server import REQUEST_TIMEOUT, BenchServer


def run(clients: int, messages: int, tokens: int) -> dict:
    env = {"CHATBOT_MAX_NEW_TOKENS": str(tokens)}
    with BenchServer(env=env) as server:
        server.prepare()
        server.start()
        warm = server.new_conversation(max_new_tokens=tokens)
        server.ask(warm, "Hello!")  # the model is loaded before the clock starts
        conversations = [server.new_conversation(max_new_tokens=tokens) for _ in range(clients)]
        sent: dict[str, list[str]] = {c: [] for c in conversations}
        outcomes: list[dict] = []
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client(index: int) -> None:
            conversation = conversations[index]
            start.wait()
            for turn in range(messages):
                content = (
                    f"Client {index}, message {turn}: tell me one fact about the number {turn}."
                )
                with lock:
                    sent[conversation].append(content)
                began = time.perf_counter()
                try:
                    result = server.ask(conversation, content)
                    outcome = {"status": 201, "reply": result["status"]}
                except requests.HTTPError as exc:
                    outcome = {"status": exc.response.status_code, "reply": None}
                except Exception as exc:  # a broken stream, a timeout: counted, not fatal
                    outcome = {"status": None, "reply": None, "error": repr(exc)}
                outcome["latency_s"] = time.perf_counter() - began
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        stored = {c: _read_back(server, c) for c in conversations}

    latencies = [o["latency_s"] for o in outcomes]
    replies = [m for c in conversations for m in stored[c] if m["role"] == "assistant"]
    return {
        "clients": clients,
        "messages_each": messages,
        "reply_tokens": tokens,
        "requests": len(outcomes),
        "wall_s": wall,
        "server_errors": sum(1 for o in outcomes if (o["status"] or 0) >= 500),
        "failed_requests": sum(1 for o in outcomes if o["status"] != 201),
        "latency_p50_s": common.percentile(latencies, 50),
        "latency_p95_s": common.percentile(latencies, 95),
        **tally(sent, stored),
        "replies": len(replies),
        "replies_not_ok": sum(1 for m in replies if m["status"] != "ok"),
    }


def tally(sent: dict[str, list[str]], stored: dict[str, list[dict]]) -> dict:
    """User messages sent vs stored, per conversation: how many were lost or duplicated."""
    expected = collections.Counter(
        (c, content) for c, contents in sent.items() for content in contents
    )
    found = collections.Counter(
        (c, m["content"]) for c, messages in stored.items() for m in messages if m["role"] == "user"
    )
    return {
        "sent": sum(expected.values()),
        "stored": sum(found.values()),
        "lost": sum((expected - found).values()),
        "duplicated": sum((found - expected).values()),
    }


def _read_back(server: BenchServer, conversation: str) -> list[dict]:
    """Every message of the conversation, all versions, through the API's pages."""
    found, url = [], f"{server.url}/api/conversations/{conversation}/messages/"
    while url:
        page = requests.get(url, headers=server.headers, timeout=REQUEST_TIMEOUT)
        page.raise_for_status()
        body = page.json()
        found.extend({**m, "conversation": conversation} for m in body["results"])
        url = body.get("next")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--messages", type=int, default=3, help="messages per client")
    parser.add_argument("--tokens", type=int, default=16, help="reply budget in tokens")
    args = parser.parse_args(argv)
    result = run(args.clients, args.messages, args.tokens)
    rows = [
        ("clients x messages", f"{result['clients']} x {result['messages_each']}"),
        ("requests", result["requests"]),
        ("5xx responses", result["server_errors"]),
        ("requests not answered 201", result["failed_requests"]),
        ("latency p50 / p95", f"{result['latency_p50_s']:.2f} / {result['latency_p95_s']:.2f} s"),
        ("user messages stored / sent", f"{result['stored']} / {result['sent']}"),
        ("lost", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("replies stored / not ok", f"{result['replies']} / {result['replies_not_ok']}"),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    clean = not (result["server_errors"] or result["lost"] or result["duplicated"])
    print("target (zero 5xx, zero lost, zero duplicated):", "met" if clean else "NOT met")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
