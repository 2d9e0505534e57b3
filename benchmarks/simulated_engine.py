"""A simulated OpenAI-compatible inference server for the relay benchmark (benchmarks/relay.py):

    python -m benchmarks.simulated_engine --port 8100 --tokens 100 --rate 10

It answers every chat completion with `--tokens` pieces at `--rate` pieces a second, each piece
the time it was sent (`time.monotonic()`, one clock for every process of the machine), so that a
client can tell how long each piece took to reach it through whatever sits in between. It counts
what it was sent: `GET /stats` gives the requests, the number of messages each carried, the
streams in flight (and their peak) and those whose client went away. A raw ASGI application
served by uvicorn: one event loop, so it costs little of the machine it shares.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

MODEL = "simulated"
WINDOW = 8192


class SimulatedEngine:
    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens = tokens
        self.interval = 1.0 / rate
        self.requests = 0
        self.completed = 0
        self.disconnected = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.messages_per_request: collections.Counter[int] = collections.Counter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/models" and method == "GET":
            listing = {"id": MODEL, "object": "model", "max_model_len": WINDOW}
            await _json(send, 200, {"object": "list", "data": [listing]})
        elif path == "/v1/chat/completions" and method == "POST":
            await self._complete(receive, send)
        elif path == "/stats" and method == "GET":
            await _json(send, 200, self.stats())
        else:
            await _json(send, 404, {"error": {"message": f"No route {method} {path}"}})

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "messages_per_request": dict(self.messages_per_request),
        }

    async def _complete(self, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        self.requests += 1
        self.messages_per_request[len(request["messages"])] += 1
        count = min(self.tokens, int(request.get("max_tokens") or self.tokens))
        gone = asyncio.Event()
        listener = asyncio.ensure_future(_wait_for_disconnect(receive, gone))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            for index in range(count):
                delay = started + index * self.interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if gone.is_set():
                    self.disconnected += 1
                    return
                piece = {"index": 0, "delta": {"content": f"{time.monotonic():.6f} "}}
                await _event(send, {"object": "chat.completion.chunk", "choices": [piece]})
            last = {"index": 0, "delta": {}, "finish_reason": "length"}
            usage = {"prompt_tokens": 0, "completion_tokens": count, "total_tokens": count}
            await _event(send, {"choices": [last], "usage": usage})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            self.completed += 1
        finally:
            self.in_flight -= 1
            listener.cancel()


async def _wait_for_disconnect(receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _event(send, data: dict) -> None:
    chunk = f"data: {json.dumps(data)}\n\n".encode()
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _json(send, status: int, data: dict) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="pieces a second, per stream")
    args = parser.parse_args()
    engine = SimulatedEngine(args.tokens, args.rate)
    uvicorn.run(
        engine, host="127.0.0.1", port=args.port, log_level="warning", backlog=4096, http="h11"
    )


if __name__ == "__main__":
    main()
