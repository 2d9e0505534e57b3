"""What the web side needs from an engine: the seam between Django and the generation layer.

The views, services and context builder depend on `ChatEngine` alone. The embedded engine
(engine.Engine) implements it, so does the one that asks an inference server (remote.RemoteEngine)
and the tests' stand-in (tests/fakes.py). Importing this module imports no torch and no Django.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol, TypedDict

from .prefix_cache import CacheKey


class ChatMessage(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


class FinishReason(StrEnum):
    """Why a reply ended (stored with it, as its value)."""

    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # the reply budget ran out
    CANCELLED = "cancelled"  # stopped before either


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    # Texts that end the reply where they first appear, left out of it (OpenAI's `stop`).
    stop: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        params = asdict(self)
        if not self.stop:  # (most replies have none: their stored parameters stay as they were)
            del params["stop"]
        else:
            params["stop"] = list(self.stop)
        return params


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: int
    total_ms: int
    finish_reason: FinishReason


class StreamingReply(Protocol):
    """One reply being written: iterate it for pieces of text as they come. Once iteration
    ends (finished, cancelled, or abandoned by the consumer), `result` holds the Generation."""

    @property
    def result(self) -> Generation | None: ...

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None:
        """Stop writing (thread-safe); the reply ends with what was written."""


class ChatEngine(Protocol):
    """Writes the assistant's turns of chats. Messages are the whole chat as the model should
    read it, oldest first; what the engine keeps between turns is only ever a saving.

    Engines subclass it to inherit `generate`, which reads `stream` to its end.
    """

    @property
    def model_name(self) -> str:
        """What replies are labelled with, known without loading the model."""

    def load(self) -> object:
        """Get ready to answer (the first reply does it otherwise)."""

    def is_ready(self) -> bool:
        """Whether the engine answers replies now without first loading anything: what a load
        balancer's readiness probe asks (chatsite/health.py). Quick, never loads, never raises."""

    def prompt_budget(self, params: GenerationParams) -> int:
        """Tokens the prompt may take once the reply's budget is set aside."""

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt tokens for these messages, as the model will read them."""

    def stream(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> StreamingReply:
        """The next turn, as it is written. `cache_key` names the conversation (what is kept
        of it serves its next turn); `owner` is whose reply it is (by default the key's)."""

    def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> Generation:
        """The next turn, written whole."""
        return read_to_end(self.stream(messages, params, cache_key=cache_key, owner=owner))

    def score_reply(self, messages: list[ChatMessage], reply: str) -> float:
        """Log-probability (natural log, summed over its tokens) that the model answers these
        messages with `reply`: what the model makes of a context, without sampling from it."""

    def forget(self, conversation: str) -> Future[None]:
        """Drop what is kept of a conversation's turns (its text was deleted); the Future is
        done once it is gone."""

    def queue_depth(self) -> int:
        """Replies this engine holds now: waiting for the model or being written (in flight to
        the inference server). Read by the metrics at scrape time: quick, never loads, never
        raises."""


def already_done() -> Future[None]:
    """What `forget` returns when nothing of the conversation was kept to drop."""
    done: Future[None] = Future()
    done.set_result(None)
    return done


def read_to_end(stream: StreamingReply) -> Generation:
    """Read a reply to its end; its Generation."""
    for _ in stream:
        pass
    if stream.result is None:
        raise RuntimeError("The reply ended without its result")
    return stream.result
