"""The real product over HTTP for the benchmarks: tests/live_server.py's Server (gunicorn, the
real model, a temporary var dir), a user with an API token, a streaming client that times what a
client sees, and the serving worker's memory from /proc."""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from .common import BENCH_DIR, setup_django

USERNAME = "bench"
PASSWORD = "bench-Passw0rd-not-secret"
REQUEST_TIMEOUT = 300  # seconds; every request is bounded


class BenchServer:
    """A gunicorn server of the product with its own temporary var dir and one API user.

    `env` overrides the server's environment (e.g. CHATBOT_MAX_NEW_TOKENS, CHATBOT_MODEL_CACHE).
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        setup_django()  # live_server reads the model cache from the settings
        from tests.live_server import Server

        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.var_dir = Path(tempfile.mkdtemp(prefix="server-", dir=BENCH_DIR))
        # Benchmarks measure throughput, not the per-user limits: one user posts them all.
        env = {
            "CHATBOT_MESSAGES_PER_MINUTE": "0",
            "CHATBOT_CONVERSATIONS_PER_MINUTE": "0",
            "CHATBOT_REPLIES_PER_USER": "0",
            **(env or {}),
        }
        self.server = Server(self.var_dir, env=env)
        self.url = self.server.url
        self.token = secrets.token_hex(20)
        self.headers = {"Authorization": f"Token {self.token}"}

    def prepare(self) -> None:
        """Database, static files and the API user (outside any timing)."""
        self.server.prepare()
        self._create_user(USERNAME, self.token)

    def add_user(self, username: str) -> dict[str, str]:
        """Another API user; returns the headers that sign its requests."""
        token = secrets.token_hex(20)
        self._create_user(username, token)
        return {"Authorization": f"Token {token}"}

    def _create_user(self, username: str, token: str) -> None:
        self.server.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            "from accounts.keys import issue_key; "
            f"user = get_user_model().objects.create_user({username!r}, password={PASSWORD!r}); "
            f"issue_key(user=user, name='benchmark', key={token!r})",
        )

    def start(self) -> None:
        self.server.start()

    def warm_up(self) -> None:
        """One short reply, so that the model is loaded before what follows."""
        self.ask(self.new_conversation(max_new_tokens=4), "Hello!")

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.var_dir, ignore_errors=True)

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # API

    def new_conversation(self, headers: dict[str, str] | None = None, **fields) -> str:
        """A conversation with a title (so the model writes no title after the first reply),
        of the benchmark's user or of the one `headers` sign for."""
        response = requests.post(
            f"{self.url}/api/conversations/",
            json={"title": "Benchmark", **fields},
            headers=headers or self.headers,
            timeout=REQUEST_TIMEOUT,
        )
        response.raise_for_status()
        return response.json()["id"]

    def ask(self, conversation: str, content: str, on_first_text=None, headers=None) -> dict:
        """Post a message and read the streamed reply: seconds to the first text and to the
        end, as the client sees them, and the reply's completion tokens. `on_first_text()` is
        called when the first text arrives (the reply is being written)."""
        started = time.perf_counter()
        first = None
        done = None
        event = ""
        with requests.post(
            f"{self.url}/api/conversations/{conversation}/messages/",
            json={"content": content},
            headers={**(headers or self.headers), "Accept": "text/event-stream"},
            stream=True,
            timeout=REQUEST_TIMEOUT,
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    if event == "delta" and first is None:
                        first = time.perf_counter()
                        if on_first_text is not None:
                            on_first_text()
                    elif event == "error":
                        raise RuntimeError(f"the server failed to answer: {line}")
                    elif event == "done":
                        done = json.loads(line[len("data: ") :])
                        break
        finished = time.perf_counter()
        if done is None:
            raise RuntimeError("the reply stream ended without a done event")
        return {
            "ttft_s": (first or finished) - started,
            "latency_s": finished - started,
            "completion_tokens": done["completion_tokens"] or 0,
            "server_ttft_ms": done.get("ttft_ms"),
            "status": done.get("status"),
        }

    # Memory

    def worker_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process(self.server.process.pid).children(recursive=True)]

    def worker_memory_mb(self) -> dict:
        """VmHWM (peak resident set) and VmRSS of the serving worker, in MiB."""
        pids = self.worker_pids()
        if not pids:
            return {}
        return proc_memory_mb(pids[0])


def proc_memory_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


@contextmanager
def running(env: dict[str, str] | None = None) -> Iterator[BenchServer]:
    """A BenchServer prepared, started and warmed up; stopped and removed after."""
    server = BenchServer(env=env)
    try:
        server.prepare()
        server.start()
        server.warm_up()
        yield server
    finally:
        server.stop()
