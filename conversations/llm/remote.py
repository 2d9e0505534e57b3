"""An engine that has an OpenAI-compatible inference server write the replies (vLLM, SGLang,
TGI, llama.cpp's server, Ollama, `transformers serve`): the web process loads no weights and
imports no torch.

Replies stream from the server's chat completions stream. Stopping a reply closes that stream,
which those servers take as the request's end. The read timeout applies between two pieces of
the stream, not to the whole reply. Servers differ in small ways, all tolerated here: a stream
may end with `data: [DONE]` or without it, usage may ride on any chunk (or none), and an error
body may be OpenAI's `{"error": {...}}` or FastAPI's `{"detail": ...}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

from .in_flight import InFlight
from .interface import (
    ChatEngine,
    ChatMessage,
    FinishReason,
    Generation,
    GenerationParams,
    already_done,
)
from .prefix_cache import CacheKey
from .remote_tokens import TokenCounter, pick_counter

# When neither the server, CHATBOT_CONTEXT_TOKENS nor a tokenizer folder gives the window.
DEFAULT_WINDOW = 2048
# Readiness (is_ready): seconds the server has to answer GET /models, and seconds an answer is
# trusted for, so that a load balancer asking every second costs the server a request every few.
READY_TIMEOUT = 2.0
READY_KEPT = 2.0
# Seconds a failed GET /models is kept: a message asks for the model's name, its window and its
# reply in turn, and a server that is down should cost it one connect timeout, not one each.
UNAVAILABLE_KEPT = 2.0
# Prompt counts kept: a reply whose stream reports no usage takes its prompt's count from the
# one made while its context was built, rather than ask the server (or render the template) again.
COUNTS_KEPT = 64

logger = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The inference server could not be reached, or refused or broke off a reply."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    window: int  # tokens the model reads, prompt and reply together
    counter: TokenCounter


class RemoteEngine(ChatEngine):
    def __init__(
        self,
        *,
        base_url: str,
        model: str = "",
        api_key: str = "",
        context_tokens: int = 0,
        tokenizer: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # vLLM's and llama.cpp's tokenize endpoints sit at the root, beside /v1.
        self.root = self.base_url.removesuffix("/v1")
        self.configured_model = model
        self.context_tokens = context_tokens
        self.tokenizer_folder = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        # No cap on connections: every reply being written holds one for as long as it streams.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        self.client = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self._served: ServedModel | None = None
        self._lock = threading.Lock()
        self._ready_until = 0.0  # (time.monotonic) until when the last answer to /models holds
        self._unavailable = ""  # why the last discovery failed
        self._unavailable_until = 0.0  # (time.monotonic) until when that failure holds
        self._counts = RecentCounts(COUNTS_KEPT)
        self.in_flight = InFlight()  # replies being streamed from the server

    @property
    def model_name(self) -> str:
        if self.configured_model:
            return self.configured_model
        try:
            return self.load().name
        except EngineUnavailable:
            return ""  # (the reply itself then fails with the reason)

    def load(self) -> ServedModel:
        """Ask the server which model it serves and how to count its tokens (once). A failure
        is raised again, without asking, for UNAVAILABLE_KEPT seconds."""
        with self._lock:
            if self._served is None:
                if time.monotonic() < self._unavailable_until:
                    raise EngineUnavailable(self._unavailable)
                try:
                    self._served = self._discover()
                except EngineUnavailable as exc:
                    self._unavailable = str(exc)
                    self._unavailable_until = time.monotonic() + UNAVAILABLE_KEPT
                    raise
            return self._served

    def _discover(self) -> ServedModel:
        listing = self._call("GET", "/models").get("data") or []
        models = {str(item.get("id")): item for item in listing if isinstance(item, dict)}
        name = self.configured_model or next(iter(models), "")
        if not name:
            raise EngineUnavailable(f"The inference server at {self.base_url} lists no model.")
        if models and name not in models:
            # Some servers answer any name with the model they have: replies would be labelled
            # with a model that did not write them.
            raise EngineUnavailable(
                f"The inference server at {self.base_url} serves {', '.join(models)}, not "
                f"{name}: set CHATBOT_ENGINE_MODEL to one of those."
            )
        # The window: the server's (vLLM reports it), capped by CHATBOT_CONTEXT_TOKENS; else the
        # model's own, from the tokenizer folder's config.json.
        reported = models.get(name, {}).get("max_model_len")
        windows = [w for w in (reported, self.context_tokens) if isinstance(w, int) and w > 0]
        counter = pick_counter(self.client, self.root, name, self.tokenizer_folder)
        window = min(windows, default=0) or folder_window(self.tokenizer_folder) or DEFAULT_WINDOW
        return ServedModel(name, window, counter)

    def is_ready(self) -> bool:
        """Whether the server answers GET /models within READY_TIMEOUT seconds. A success holds
        for READY_KEPT seconds; a failure is logged, and not kept: the next probe asks again."""
        if time.monotonic() < self._ready_until:
            return True
        try:
            answer = self.client.get(self.base_url + "/models", timeout=READY_TIMEOUT)
        except httpx.HTTPError as exc:
            logger.warning("Not ready: %s", unreachable(self.base_url, exc))
            return False
        except Exception as exc:  # (a URL httpx cannot use, say: still an answer, not a 500)
            logger.warning("Not ready: asking %s/models failed (%r).", self.base_url, exc)
            return False
        if answer.is_error:
            logger.warning("Not ready: %s", refused(self.base_url, answer))
            return False
        self._ready_until = time.monotonic() + READY_KEPT
        return True

    def queue_depth(self) -> int:
        """Replies in flight to the server from this process."""
        return self.in_flight.count

    def reply_budget(self, params: GenerationParams) -> int:
        # Never more than half the window, as on the embedded engine.
        return min(params.max_new_tokens, self.load().window // 2)

    def prompt_budget(self, params: GenerationParams) -> int:
        return self.load().window - self.reply_budget(params)

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        served = self.load()
        key = RecentCounts.key(messages)
        known = self._counts.get(key)
        if known is not None:
            return known
        try:
            count = served.counter.count(messages)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(unreachable(self.base_url, exc)) from exc
        self._counts.put(key, count)
        return count

    def stream(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> RemoteReply:
        # The server keeps its own cache of prompts; the key and owner are ours alone.
        return RemoteReply(self, messages, params)

    def score_reply(self, messages: list[ChatMessage], reply: str) -> float:
        raise EngineUnavailable(
            "Scoring a reply needs the embedded engine: OpenAI-compatible servers do not "
            "return the log-probabilities of a given reply."
        )

    def forget(self, conversation: str) -> Future[None]:
        return already_done()  # nothing of a conversation is kept in this process

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            answer = self.client.request(method, self.base_url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(unreachable(self.base_url, exc)) from exc
        if answer.is_error:
            raise EngineUnavailable(refused(self.base_url, answer))
        body = answer.json()
        return body if isinstance(body, dict) else {}


class RecentCounts:
    """The token counts of the last `size` prompts counted, by a digest of their JSON (so that
    a long prompt is not held twice); the least recently used goes first. Thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(messages: list[ChatMessage]) -> bytes:
        text = json.dumps(messages, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def get(self, key: bytes) -> int | None:
        with self._lock:
            count = self._counts.get(key)
            if count is not None:
                self._counts.move_to_end(key)
            return count

    def put(self, key: bytes, count: int) -> None:
        with self._lock:
            self._counts[key] = count
            self._counts.move_to_end(key)
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)


class RemoteReply:
    """One reply streamed from the server. `cancel()` closes the stream, from any thread."""

    def __init__(
        self, engine: RemoteEngine, messages: list[ChatMessage], params: GenerationParams
    ) -> None:
        self.engine = engine
        self.messages = messages
        self.params = params
        self.result: Generation | None = None
        self._cancelled = threading.Event()
        self._response: httpx.Response | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        response = self._response
        if response is not None:
            response.close()

    def __iter__(self) -> Iterator[str]:
        with self.engine.in_flight:
            yield from self._pieces()

    def _pieces(self) -> Iterator[str]:
        engine = self.engine
        served = engine.load()
        budget = engine.reply_budget(self.params)
        body = {
            "model": served.name,
            "messages": self.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": budget,
            "temperature": self.params.temperature,
            "top_p": self.params.top_p,
        }
        started = time.perf_counter()
        first_at: float | None = None
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        try:
            with engine.client.stream(
                "POST", engine.base_url + "/chat/completions", json=body
            ) as response:
                self._response = response
                if response.is_error:
                    response.read()
                    raise EngineUnavailable(refused(engine.base_url, response))
                if self._cancelled.is_set():
                    response.close()
                for event in EventSource(response).iter_sse():
                    if event.data.strip() == "[DONE]":
                        break
                    chunk = _chunk(event.data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first_at = first_at or time.perf_counter()
                            pieces.append(piece)
                            yield piece
                    if finish is not None and usage:
                        break  # (a server may keep the stream open after its last chunk)
        except (httpx.HTTPError, httpx.StreamError, EngineUnavailable) as exc:
            if not self._cancelled.is_set():
                self._end(pieces, usage, None, started, first_at)
                if isinstance(exc, EngineUnavailable):
                    raise
                raise EngineUnavailable(_cut_off(engine, exc)) from exc
        if finish is None and not self._cancelled.is_set():
            self._end(pieces, usage, None, started, first_at)
            raise EngineUnavailable(
                f"The inference server at {engine.base_url} ended the reply without finishing it."
            )
        self._end(pieces, usage, finish, started, first_at)

    def _end(
        self,
        pieces: list[str],
        usage: dict[str, Any],
        finish: str | None,
        started: float,
        first_at: float | None,
    ) -> None:
        finished = time.perf_counter()
        if self._cancelled.is_set() and finish is None:
            reason = FinishReason.CANCELLED
        elif finish == "length":
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        self.result = Generation(
            text="".join(pieces),
            prompt_tokens=(
                prompt_tokens
                if isinstance(prompt_tokens, int)
                else self.engine.count_tokens(self.messages)
            ),
            # Without usage, a piece of the stream is about a token.
            completion_tokens=(
                completion_tokens if isinstance(completion_tokens, int) else len(pieces)
            ),
            ttft_ms=round(((first_at or finished) - started) * 1000),
            total_ms=round((finished - started) * 1000),
            finish_reason=reason,
        )


def folder_window(folder: str) -> int:
    """The context window a model folder's config.json states (0: none stated)."""
    config = Path(folder, "config.json") if folder else None
    if config is None or not config.is_file():
        return 0
    try:
        window = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return 0
    return window if isinstance(window, int) and window > 0 else 0


def unreachable(base_url: str, exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"The inference server at {base_url} did not answer in time ({exc!r})."
    return f"The inference server at {base_url} could not be reached ({exc})."


def refused(base_url: str, answer: httpx.Response) -> str:
    return (
        f"The inference server at {base_url} answered {answer.status_code}: {error_detail(answer)}"
    )


def error_detail(answer: httpx.Response) -> str:
    """What an error body says: OpenAI's {"error": {"message": ...}}, FastAPI's
    {"detail": ...}, or the text as it is."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:500] or answer.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineUnavailable(
            f"The inference server sent a piece that is not JSON: {data[:200]}"
        ) from None
    if not isinstance(chunk, dict):
        return {}
    if chunk.get("error"):  # an error reported inside the stream
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise EngineUnavailable(f"The inference server stopped the reply: {message}")
    return chunk


def _cut_off(engine: RemoteEngine, exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        seconds = engine.client.timeout.read
        return f"The inference server at {engine.base_url} sent nothing for {seconds} s."
    if isinstance(exc, httpx.ConnectError):
        return unreachable(engine.base_url, exc)
    return f"The inference server at {engine.base_url} broke off the reply ({exc})."
