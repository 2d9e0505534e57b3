"""How many concurrent streaming conversations one web process relays from an inference server,
and what it adds to each token, on loopback:

    python -m benchmarks.relay [--streams 256] [--tokens 100] [--rate 10] [--turns 2]

A simulated OpenAI-compatible server (benchmarks/simulated_engine.py) writes every reply as
`--tokens` pieces at `--rate` a second, each piece the time it was sent. One web process of the
product (gunicorn, CHATBOT_ENGINE_URL pointing at it, one worker) relays them: `--streams`
conversations, each posting `--turns` messages one after another through the API, all streamed;
they start one after another over one reply's time (as people's messages come), and from then on
all of them stream at once. A client in one asyncio process reads every stream and takes, for every
piece, the time it arrived minus the time the server sent it.

The same client first reads the same number of streams straight from the simulated server: what
the client and the machine add by themselves. Printed: streams in flight at the peak, the
pieces' delay through the product and straight (p50/p95/max), the gap between two pieces as
received minus as sent (p95), errors, and what was stored: every message and every reply read
back from the API, and what the server was sent (each follow-up carried the earlier turns). Also
the web process's start-up time and peak memory with a remote engine. Figures, never judged by a
test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import psutil

from . import common
from .report import Report, fmt, fmt_ratio
from .server import REQUEST_TIMEOUT, BenchServer

KEY = "relay"
TARGET_STREAMS = 256
TARGET_P95_MS = 50.0


@dataclass
class Streams:
    """What the client saw of all streams of one run."""

    delays: list[float] = field(default_factory=list)  # seconds, arrival - sending, per piece
    added_gaps: list[float] = field(default_factory=list)  # gap received - gap sent
    pieces: int = 0
    errors: list[str] = field(default_factory=list)
    replies: int = 0
    seconds: float = 0.0

    def take(self, text: str, arrived: float, last: list[float]) -> None:
        """The pieces of one event's text (each a sending time) that arrived at `arrived`;
        `last` holds the previous piece's (sent, arrived) of the same stream."""
        for stamp in text.split():
            sent = float(stamp)
            self.delays.append(arrived - sent)
            if last:
                self.added_gaps.append((arrived - last[1]) - (sent - last[0]))
            last[:] = [sent, arrived]
            self.pieces += 1

    def summary(self) -> dict:
        ms = [d * 1000 for d in self.delays]
        gaps = [g * 1000 for g in self.added_gaps]
        return {
            "pieces": self.pieces,
            "replies": self.replies,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "seconds": round(self.seconds, 1),
            "pieces_per_s": round(self.pieces / self.seconds, 1) if self.seconds else None,
            "delay_p50_ms": round(common.percentile(ms, 50), 1) if ms else None,
            "delay_p95_ms": round(common.percentile(ms, 95), 1) if ms else None,
            "delay_max_ms": round(max(ms), 1) if ms else None,
            "added_gap_p95_ms": round(common.percentile(gaps, 95), 1) if gaps else None,
        }


class SimulatedServer:
    """benchmarks/simulated_engine.py in a process of its own, on a free loopback port."""

    def __init__(self, tokens: int, rate: float) -> None:
        from tests.live_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "benchmarks.simulated_engine"),
                *("--port", str(self.port), "--tokens", str(tokens), "--rate", str(rate)),
            ],
            cwd=common.ROOT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the simulated engine did not start")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits)


async def _straight(url: str, streams: int, turns: int, stagger: float) -> Streams:
    """`streams` streams of `turns` replies each, read from the simulated server itself, the
    n-th starting n * `stagger` seconds after the first."""
    seen = Streams()

    async def one(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * stagger)
        for _ in range(turns):
            body = {"model": "simulated", "stream": True, "messages": [{"role": "user"}]}
            last: list[float] = []
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        arrived = time.monotonic()
                        for choice in json.loads(line[6:])["choices"]:
                            seen.take(choice["delta"].get("content") or "", arrived, last)
                seen.replies += 1
            except Exception as exc:
                seen.errors.append(repr(exc))

    async with _client(streams) as client:
        started = time.monotonic()
        await asyncio.gather(*(one(client, index) for index in range(streams)))
        seen.seconds = time.monotonic() - started
    return seen


async def _through(
    server: BenchServer, conversations: list[str], turns: int, stagger: float
) -> Streams:
    """Each conversation posts `turns` messages through the product's API, streamed, the n-th
    starting n * `stagger` seconds after the first."""
    seen = Streams()
    headers = {**server.headers, "Accept": "text/event-stream"}

    async def one(client: httpx.AsyncClient, index: int, conversation: str) -> None:
        await asyncio.sleep(index * stagger)
        url = f"{server.url}/api/conversations/{conversation}/messages/"
        for turn in range(turns):
            last: list[float] = []
            event = ""
            try:
                content = f"Message {turn} of conversation {conversation}."
                async with client.stream(
                    "POST", url, json={"content": content}, headers=headers
                ) as r:
                    if r.is_error:
                        await r.aread()
                        seen.errors.append(f"{r.status_code}: {r.text[:200]}")
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: "):
                            if event == "delta":
                                text = json.loads(line[6:])["text"]
                                seen.take(text, time.monotonic(), last)
                            elif event == "done":
                                seen.replies += 1
                            elif event == "error":
                                seen.errors.append(line[:200])
                                return
            except Exception as exc:
                seen.errors.append(repr(exc))
                return

    async with _client(len(conversations)) as client:
        started = time.monotonic()
        await asyncio.gather(*(one(client, i, c) for i, c in enumerate(conversations)))
        seen.seconds = time.monotonic() - started
    return seen


def _stored(server: BenchServer, conversations: list[str], turns: int, tokens: int) -> dict:
    """Every conversation read back: its user messages and its replies with all their pieces."""
    missing_messages = bad_replies = 0
    with httpx.Client(headers=server.headers, timeout=REQUEST_TIMEOUT) as client:
        for conversation in conversations:
            answer = client.get(f"{server.url}/api/conversations/{conversation}/messages/")
            answer.raise_for_status()
            messages = answer.json()["results"]
            users = [m for m in messages if m["role"] == "user"]
            replies = [m for m in messages if m["role"] == "assistant"]
            missing_messages += turns - len(users)
            bad_replies += turns - sum(
                1 for m in replies if m["status"] == "ok" and len(m["content"].split()) == tokens
            )
    return {"missing_user_messages": missing_messages, "replies_not_whole": bad_replies}


def _show_server_errors(server: BenchServer) -> None:
    log = server.server.log.read_text(errors="replace").splitlines()
    problems = [line for line in log if not line.startswith("127.0.0.1 - ")]
    print("  the server's log says:", *problems[:20], sep="\n    ", flush=True)


def measure(streams: int, tokens: int, rate: float, turns: int) -> dict:
    # The conversations start one after another over one reply's time, as people's messages
    # arrive, not all in the same instant: from then on all of them stream at once.
    stagger = tokens / rate / streams
    engine = SimulatedServer(tokens, rate)
    try:
        straight = asyncio.run(_straight(engine.url, streams, turns, stagger)).summary()
        print(f"  straight from the simulated engine: {straight}", flush=True)
        env = {
            "CHATBOT_ENGINE_URL": f"{engine.url}/v1",
            "CHATBOT_ENGINE_MODEL": "simulated",
            "CHATBOT_MAX_NEW_TOKENS": str(tokens),
            "CHATBOT_WEB_THREADS": str(streams + 16),
            "WEB_CONCURRENCY": "1",
        }
        with BenchServer(env=env) as server:
            server.prepare()
            began = time.monotonic()
            server.start()
            startup_s = time.monotonic() - began
            conversations = [server.new_conversation() for _ in range(streams)]
            before = engine.stats()["requests"]
            worker = psutil.Process(server.worker_pids()[0])
            cpu_before = sum(worker.cpu_times()[:2])
            through = asyncio.run(_through(server, conversations, turns, stagger)).summary()
            cpu_s = sum(worker.cpu_times()[:2]) - cpu_before
            print(f"  through one web process: {through}", flush=True)
            memory = server.worker_memory_mb()
            stored = _stored(server, conversations, turns, tokens)
            if through["errors"]:
                _show_server_errors(server)
        stats = engine.stats()
    finally:
        engine.stop()
    # The messages each request of the product carried: the system prompt and 2t+1 turns.
    expected = {str(2 + 2 * turn): streams for turn in range(turns)}
    carried = {k: v for k, v in stats["messages_per_request"].items() if int(k) > 1}
    return {
        "streams": streams,
        "tokens": tokens,
        "rate": rate,
        "turns": turns,
        "straight": straight,
        "through": through,
        "peak_streams": stats["peak_in_flight"],
        "engine_requests": stats["requests"] - before,
        "engine_disconnected": stats["disconnected"],
        "history_carried": carried == expected,
        "messages_per_request": carried,
        "stored": stored,
        # The web process's CPU time per relayed piece, and its share of one core meanwhile.
        "web_cpu_ms_per_piece": round(cpu_s * 1000 / max(1, through["pieces"]), 3),
        "web_cpu_share": round(cpu_s / through["seconds"], 2) if through["seconds"] else None,
        "web_startup_s": round(startup_s, 2),
        "web_memory_mb": memory,
    }


def run(report: Report, quick: bool) -> None:
    streams = 64 if quick else TARGET_STREAMS
    section = report.section(KEY, f"One web process relaying {streams} streams at 10 tokens/s")
    result = measure(streams, tokens=100, rate=10.0, turns=3)
    through, straight = result["through"], result["straight"]
    report.row(
        KEY,
        "Delay per token through the product",
        f"p95 {fmt(through['delay_p95_ms'])} ms",
        f"p50 {fmt(through['delay_p50_ms'])} ms, max {fmt(through['delay_max_ms'])} ms; gap "
        f"between tokens p95 +{fmt(through['added_gap_p95_ms'])} ms; the same client straight "
        f"from the engine: p95 {fmt(straight['delay_p95_ms'])} ms",
    )
    stored = result["stored"]
    lost = stored["missing_user_messages"] + stored["replies_not_whole"]
    report.row(
        KEY,
        "Streams at once, errors, lost",
        f"{result['peak_streams']}, {through['errors']}, {lost}",
        f"{through['pieces']} tokens in {through['seconds']} s; every follow-up carried the "
        f"earlier turns: {'yes' if result['history_carried'] else 'NO'}",
    )
    report.row(
        KEY,
        "The web process",
        f"{result['web_cpu_ms_per_piece']} ms CPU a token",
        f"{result['web_cpu_share']} of a core; started in {result['web_startup_s']} s; "
        f"peak {fmt(result['web_memory_mb'].get('VmHWM'))} MiB",
    )
    report.target(
        f"{TARGET_STREAMS} streams, p95 added delay < {TARGET_P95_MS:.0f} ms, 0 errors, 0 lost",
        f">= {TARGET_STREAMS} at once",
        f"{result['peak_streams']} at once, p95 {fmt(through['delay_p95_ms'])} ms, "
        f"{through['errors']} errors, {lost} lost",
        result["peak_streams"] >= TARGET_STREAMS
        and (through["delay_p95_ms"] or 1e9) < TARGET_P95_MS
        and through["errors"] == 0
        and lost == 0
        and result["history_carried"],
    )

    llama = llama_overhead(runs=1 if quick else LLAMA_RUNS)
    result["llama"] = llama
    section.data = result
    ratio = llama["ratio_tokens_per_s"]
    report.row(
        KEY,
        "llama.cpp's server: one reply through the product vs straight",
        fmt_ratio(ratio),
        f"{fmt(llama['through_tokens_per_s'])} vs {fmt(llama['straight_tokens_per_s'])} tok/s "
        f"(medians of {llama['runs']}, alternating); decode alone "
        f"{fmt_ratio(llama['ratio_decode_tokens_per_s'])}",
    )
    report.target(
        "Tokens/s through the product vs straight from llama.cpp's server",
        ">= 0.95x",
        fmt_ratio(ratio),
        ratio >= 0.95 if ratio is not None else None,
    )


# -- through llama.cpp's server ---------------------------------------------------------------

LLAMA_PROMPT = "Write a long story about a lighthouse keeper named {name}."
LLAMA_RUNS = 5
LLAMA_NAMES = ["Ada", "Ben", "Clara", "David", "Elena", "Finn", "Greta", "Hugo"]


def _timed_stream(lines, delta_text) -> dict:
    """Seconds to the first piece and to the end, and the pieces, of one streamed reply:
    `lines` its SSE lines, `delta_text(event, data)` the text a line carries (or None)."""
    started = time.perf_counter()
    first = None
    pieces = 0
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif (
            line.startswith("data: ")
            and line != "data: [DONE]"
            and delta_text(event, json.loads(line[6:]))
        ):
            first = first or time.perf_counter()
            pieces += 1
    finished = time.perf_counter()
    first = first or finished
    return {
        "pieces": pieces,
        "tokens_per_s": pieces / (finished - started),
        "decode_tokens_per_s": (pieces - 1) / (finished - first) if pieces > 1 else None,
    }


def llama_overhead(runs: int, tokens: int = 128) -> dict:
    """Tokens/s of one reply at a time from llama.cpp's server (llama-cpp-python, the bundled
    GGUF): straight from it, and through the product (one web process, CHATBOT_ENGINE_URL),
    alternately, the same messages and parameters each time."""
    from tests.inference_servers import LLAMA_CPP_ALIAS, llama_cpp_server, running_server

    from .common import SYSTEM_PROMPT, bundled_gguf

    straight, through = [], []
    with running_server(llama_cpp_server(bundled_gguf())) as llama:
        env = {
            "CHATBOT_ENGINE_URL": llama.url,
            "CHATBOT_ENGINE_MODEL": LLAMA_CPP_ALIAS,
            "CHATBOT_MAX_NEW_TOKENS": str(tokens),
            "CHATBOT_SYSTEM_PROMPT": SYSTEM_PROMPT,
        }
        with BenchServer(env=env) as server, httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            server.prepare()
            server.start()
            server.warm_up()
            for run in range(runs):
                prompt = LLAMA_PROMPT.format(name=LLAMA_NAMES[run % len(LLAMA_NAMES)])
                body = {
                    "model": LLAMA_CPP_ALIAS,
                    "stream": True,
                    "max_tokens": tokens,
                    "temperature": 0.0,
                    "top_p": 0.9,
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": prompt},
                    ],
                }
                with client.stream("POST", f"{llama.url}/chat/completions", json=body) as r:
                    r.raise_for_status()
                    straight.append(
                        _timed_stream(
                            r.iter_lines(),
                            lambda _, d: any(
                                c["delta"].get("content") for c in d.get("choices") or []
                            ),
                        )
                    )
                conversation = server.new_conversation()
                url = f"{server.url}/api/conversations/{conversation}/messages/"
                headers = {**server.headers, "Accept": "text/event-stream"}
                with client.stream("POST", url, json={"content": prompt}, headers=headers) as r:
                    r.raise_for_status()
                    through.append(_timed_stream(r.iter_lines(), lambda e, _: e == "delta"))
                print(f"  llama.cpp run {run + 1}: straight {straight[-1]}, through {through[-1]}")

    def median(values: list[dict], key: str) -> float | None:
        known = [v[key] for v in values if v[key] is not None]
        return statistics.median(known) if known else None

    result = {"runs": runs, "tokens": tokens}
    for key in ("tokens_per_s", "decode_tokens_per_s"):
        result[f"straight_{key}"] = median(straight, key)
        result[f"through_{key}"] = median(through, key)
        result[f"ratio_{key}"] = common.ratio(result[f"through_{key}"], result[f"straight_{key}"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=TARGET_STREAMS)
    parser.add_argument("--tokens", type=int, default=100, help="pieces per reply")
    parser.add_argument("--rate", type=float, default=10.0, help="pieces a second per stream")
    parser.add_argument("--turns", type=int, default=3, help="messages per conversation")
    parser.add_argument(
        "--llama",
        type=int,
        default=0,
        metavar="RUNS",
        help="instead: RUNS replies straight from llama.cpp's server and as many through the "
        "product (builds llama.cpp once, ~10 minutes)",
    )
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    if args.llama:
        result = llama_overhead(args.llama)
    else:
        result = measure(args.streams, args.tokens, args.rate, args.turns)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
