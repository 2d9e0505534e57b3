"""A soak: the serving worker's memory over a long mixed workload through the real server.

    python -m benchmarks.soak [--messages 1000] [--clients 6] [--users 4] [--tokens 48]
    python -m benchmarks --only soak

gunicorn serves the real model on loopback (benchmarks/server.py). Several users' clients run
at once, each with conversations of its own, and each message is one of: a turn of a long
conversation (pasted notes of ~150 tokens a turn, so its history grows to thousands of tokens
before the client starts another), a new short conversation or a follow-up in one, a stream
closed after a few tokens, a regeneration (some streamed and dropped early), or an edit of the
last message; between them the clients search their chats and export one. The worker's resident
memory (VmRSS in /proc) is printed after every 100 messages, then the ratio RSS(last) /
RSS(200) against the target (within 10%) and the peak (VmHWM). Figures only: nothing asserts.

Memory-related settings (CHATBOT_PREFIX_CACHE_MB, MALLOC_ARENA_MAX, ...) pass through from the
environment to the server, so their effect is measured by running this again with them set.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import threading
import time

import requests

from .report import Report, fmt, fmt_ratio
from .server import REQUEST_TIMEOUT, BenchServer

KEY = "soak"
MESSAGES = 1000
CLIENTS = 6
USERS = 4
REPLY_TOKENS = 48
EVERY = 100  # messages between two readings of the worker's memory
BASELINE = 200  # the reading the last one is compared with
TARGET = 1.10  # RSS(last) / RSS(BASELINE)
# A long conversation's turns before its client starts another: ~30 turns of ~200 tokens (the
# notes, the reply, the template) is ~6,000 tokens of history, most of the model's window.
LONG_TURNS = 30
# What a client does next, by weight (messages; searches and exports come between them).
ACTIONS = {
    "long_turn": 4,
    "short_turn": 3,
    "follow_up": 3,
    "stop_early": 2,
    "regenerate": 2,
    "edit": 1,
}
BUSY_RETRY_SECONDS = 30  # a conversation answered a moment ago may still be busy: 409

WORDS = (
    "river lamp engine garden winter harbor pencil violin market ladder orbit cotton signal "
    "forest copper theory window basket planet ribbon meadow thunder marble lantern compass "
    "village canvas rocket silver island kettle mirror saddle glacier velvet tunnel falcon "
    "harvest anchor circuit pepper quartz shadow timber voyage walnut yellow zephyr budget "
    "chapter desert engineer festival gravity horizon journal kitchen library machine "
    "notebook ocean puzzle recipe station teacher umbrella valley weather"
).split()
QUESTIONS = [
    "What is the capital of {w}land?",
    "Give me one tip about {w}s.",
    "Name a color that goes with {w}.",
    "Write a haiku about a {w}.",
    "What rhymes with {w}?",
    "Explain what a {w} is in one sentence.",
]


def notes(rng: random.Random, words: int = 110) -> str:
    """Pasted notes of about `words` words (~150 tokens) and a request about them."""
    sentences, left = [], words
    while left > 0:
        length = rng.randint(6, 14)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence.capitalize() + ".")
        left -= length
    return "My notes: " + " ".join(sentences) + " Which word comes up most? Answer briefly."


class Client:
    """One user's client: conversations of its own, one request at a time."""

    def __init__(self, soak: Soak, index: int, headers: dict) -> None:
        self.soak = soak
        self.rng = random.Random(index)
        self.headers = headers
        self.long: str | None = None
        self.long_turns = 0
        self.short: list[str] = []  # its short conversations, newest last
        self.url = soak.server.url

    def run(self) -> None:
        kinds, weights = zip(*ACTIONS.items(), strict=True)
        while self.soak.more():
            kind = self.rng.choices(kinds, weights)[0]
            if kind not in ("long_turn", "short_turn") and not self.short:
                kind = "short_turn"  # the others need a conversation that has a reply
            try:
                if getattr(self, kind)():
                    self.soak.count(kind)
            except requests.RequestException as exc:  # counted; the client goes on
                self.soak.status(type(exc).__name__)
            if self.rng.random() < 0.15:
                self.browse()

    # Messages (each returns whether a reply was asked for)

    def long_turn(self) -> bool:
        if self.long is None or self.long_turns >= LONG_TURNS:
            self.long, self.long_turns = self.new_conversation(), 0
        self.long_turns += 1
        return self.post(f"/api/conversations/{self.long}/messages/", {"content": notes(self.rng)})

    def short_turn(self) -> bool:
        conversation = self.new_conversation()
        self.short = [*self.short[-7:], conversation]
        return self.post(
            f"/api/conversations/{conversation}/messages/", {"content": self.question()}
        )

    def follow_up(self) -> bool:
        conversation = self.rng.choice(self.short)
        return self.post(
            f"/api/conversations/{conversation}/messages/", {"content": self.question()}
        )

    def stop_early(self) -> bool:
        conversation = self.rng.choice(self.short)
        content = "Tell me a long story about a " + self.rng.choice(WORDS) + "."
        return self.post(
            f"/api/conversations/{conversation}/messages/", {"content": content}, cut=3
        )

    def regenerate(self) -> bool:
        conversation = self.rng.choice(self.short)
        cut = 3 if self.rng.random() < 0.3 else None
        return self.post(f"/api/conversations/{conversation}/regenerate/", {}, cut=cut)

    def edit(self) -> bool:
        conversation = self.rng.choice(self.short)
        return self.post(f"/api/conversations/{conversation}/edit/", {"content": self.question()})

    def question(self) -> str:
        return self.rng.choice(QUESTIONS).format(w=self.rng.choice(WORDS))

    # Between messages

    def browse(self) -> None:
        """A search over this user's chats and an export of one of them."""
        word = self.rng.choice(WORDS)
        self.get("/api/conversations/", params={"q": word})
        if self.short:
            conversation = self.rng.choice(self.short)
            form = self.rng.choice(["json", "md"])
            self.get(f"/api/conversations/{conversation}/export/", params={"format": form})

    # HTTP

    def new_conversation(self) -> str:
        response = requests.post(
            f"{self.url}/api/conversations/",
            json={"title": "Soak", "max_new_tokens": self.soak.tokens},
            headers=self.headers,
            timeout=REQUEST_TIMEOUT,
        )
        response.raise_for_status()
        return response.json()["id"]

    def get(self, path: str, params: dict) -> None:
        response = requests.get(
            f"{self.url}{path}", params=params, headers=self.headers, timeout=REQUEST_TIMEOUT
        )
        self.soak.status(response.status_code)

    def post(self, path: str, body: dict, cut: int | None = None) -> bool:
        """Post a message (or a regeneration, an edit) and read the reply: streamed half the
        time, and with `cut`, the stream is closed after that many pieces of text. A busy
        conversation (its last reply still ending) is retried; False if there was nothing to
        answer (nothing to regenerate)."""
        stream = cut is not None or self.rng.random() < 0.5
        headers = {**self.headers, **({"Accept": "text/event-stream"} if stream else {})}
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            with requests.post(
                f"{self.url}{path}",
                json=body,
                headers=headers,
                stream=stream,
                timeout=REQUEST_TIMEOUT,
            ) as response:
                if response.status_code == 409 and time.monotonic() < deadline:
                    if "still being written" not in response.text:
                        self.soak.status(409)
                        return False  # nothing to regenerate (a stopped reply's turn)
                    time.sleep(0.2)
                    continue
                self.soak.status(response.status_code)
                if response.status_code >= 400:
                    return False
                if stream:
                    read_events(response, cut)
                return True


def read_events(response: requests.Response, cut: int | None) -> None:
    """Read an event stream to its end, or only `cut` pieces of text (closing it then)."""
    deltas = 0
    event = ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: ") :]
            if event == "delta":
                deltas += 1
                if cut is not None and deltas >= cut:
                    return  # leaving the `with` closes the connection: the server stops it
            elif event in ("done", "error"):
                return


class Soak:
    def __init__(self, server: BenchServer, messages: int, tokens: int) -> None:
        self.server = server
        self.messages = messages
        self.tokens = tokens
        self.sent = 0  # messages asked for (replies written or begun)
        self.kinds: dict[str, int] = {}
        self.statuses: dict[int | str, int] = {}  # HTTP status, or the exception
        self.readings: list[dict] = []  # {"messages", "seconds", "VmRSS", "VmHWM"}
        self._lock = threading.Lock()
        self._started = time.perf_counter()

    def more(self) -> bool:
        with self._lock:
            return self.sent < self.messages

    def count(self, kind: str) -> None:
        with self._lock:
            self.sent += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            reading = self.sent % EVERY == 0 or self.sent == self.messages
            sent = self.sent
        if reading:
            self.read(sent)

    def status(self, code: int | str) -> None:
        with self._lock:
            self.statuses[code] = self.statuses.get(code, 0) + 1

    def read(self, sent: int) -> None:
        memory = self.server.worker_memory_mb()
        reading = {"messages": sent, "seconds": time.perf_counter() - self._started, **memory}
        with self._lock:
            self.readings.append(reading)
        print(
            f"  {sent:5d} messages  {reading['seconds']:6.0f} s  "
            f"RSS {memory.get('VmRSS', 0):7.0f} MiB  peak {memory.get('VmHWM', 0):7.0f} MiB",
            flush=True,
        )


def create_users(server: BenchServer, users: int) -> list[dict]:
    """`users` accounts with API tokens (created directly: sign-ups are rate limited)."""
    tokens = [secrets.token_hex(20) for _ in range(users)]
    code = (
        "from django.contrib.auth import get_user_model; "
        "from accounts.keys import issue_key; "
        f"tokens = {tokens!r}\n"
        "for i, key in enumerate(tokens):\n"
        "    user = get_user_model().objects.create_user(f'soak{i}', password='soak-Passw0rd')\n"
        "    issue_key(user=user, name='soak', key=key)\n"
    )
    server.server.manage("shell", "-c", code)
    return [{"Authorization": f"Token {token}"} for token in tokens]


def run_soak(messages: int, clients: int, users: int, tokens: int) -> dict:
    env = {"CHATBOT_MAX_NEW_TOKENS": str(tokens)}
    with BenchServer(env=env) as server:
        server.prepare()
        headers = create_users(server, users)
        server.start()
        warm = server.new_conversation(max_new_tokens=tokens)
        server.ask(warm, "Hello!")  # the model is loaded before the first reading
        loaded = server.worker_memory_mb()
        print(f"  loaded: RSS {loaded.get('VmRSS', 0):.0f} MiB, peak {loaded.get('VmHWM', 0):.0f}")
        soak = Soak(server, messages, tokens)
        threads = [
            threading.Thread(target=Client(soak, i, headers[i % users]).run, daemon=True)
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - soak._started
        time.sleep(5)  # the scheduler gives back a burst's slot tensors once idle
        idle = server.worker_memory_mb()
    readings = sorted(soak.readings, key=lambda r: r["messages"])
    by_count = {r["messages"]: r["VmRSS"] for r in readings}
    last = readings[-1] if readings else {}
    base = by_count.get(BASELINE)
    return {
        "messages": soak.sent,
        "clients": clients,
        "users": users,
        "reply_tokens": tokens,
        "wall_s": wall,
        "loaded_mb": loaded,
        "readings": readings,
        "idle_mb": idle,
        "kinds": soak.kinds,
        "statuses": soak.statuses,
        "ratio": last.get("VmRSS") / base if base and last else None,
        "peak_mb": max((r.get("VmHWM", 0) for r in [*readings, idle]), default=None),
    }


def summary(result: dict) -> list[tuple[str, str]]:
    ratio = result["ratio"]
    last = result["readings"][-1]["messages"] if result["readings"] else 0
    verdict = "n/a" if ratio is None else ("met" if ratio <= TARGET else "NOT met")
    return [
        ("messages (by kind)", f"{result['messages']} {json.dumps(result['kinds'])}"),
        ("HTTP statuses", json.dumps(result["statuses"])),
        ("wall time", f"{result['wall_s']:.0f} s"),
        ("RSS once loaded", f"{fmt(result['loaded_mb'].get('VmRSS'), 0)} MiB"),
        ("RSS idle after the run", f"{fmt(result['idle_mb'].get('VmRSS'), 0)} MiB"),
        ("peak RSS (VmHWM)", f"{fmt(result['peak_mb'], 0)} MiB"),
        (f"RSS({last}) / RSS({BASELINE})", f"{fmt(ratio, 3)} (target <= {TARGET}: {verdict})"),
    ]


def run(report: Report, quick: bool) -> None:
    report.section(KEY, "Soak: the worker's memory over a mixed workload")
    messages = 300 if quick else MESSAGES
    result = run_soak(messages, CLIENTS, USERS, REPLY_TOKENS)
    for reading in result["readings"]:
        report.row(
            KEY,
            f"RSS after {reading['messages']} messages",
            f"{fmt(reading.get('VmRSS'), 0)} MiB",
            f"peak {fmt(reading.get('VmHWM'), 0)} MiB at {reading['seconds']:.0f} s",
        )
    for label, value in summary(result):
        report.row(KEY, label, value)
    ratio = result["ratio"]
    last = result["readings"][-1]["messages"] if result["readings"] else 0
    report.target(
        f"Soak: RSS after {last} messages vs after {BASELINE}",
        f"<= {TARGET:.2f}x",
        f"{fmt_ratio(ratio)} (peak {fmt(result['peak_mb'], 0)} MiB)",
        None if ratio is None else ratio <= TARGET,
    )
    report.sections[KEY].data.update(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--tokens", type=int, default=REPLY_TOKENS, help="reply budget")
    args = parser.parse_args(argv)
    result = run_soak(args.messages, args.clients, args.users, args.tokens)
    for label, value in summary(result):
        print(f"{label:<24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
