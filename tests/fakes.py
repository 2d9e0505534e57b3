"""A stand-in engine for tests of the web layer. The real engine and model are tested in
test_engine_*.py and test_end_to_end.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING

from conversations.llm.in_flight import InFlight
from conversations.llm.interface import (
    ChatEngine,
    ChatMessage,
    FinishReason,
    Generation,
    GenerationParams,
    already_done,
)
from conversations.llm.prefix_cache import CacheKey


class FakeStream:
    """Streams the echo word by word, like ReplyStream streams tokens."""

    def __init__(
        self, engine: FakeEngine, messages: list[ChatMessage], params: GenerationParams
    ) -> None:
        self.engine = engine
        self.messages = messages
        self.params = params
        self.cancelled = threading.Event()
        self.result: Generation | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        with self.engine.in_flight:
            yield from self._words()

    def _words(self) -> Iterator[str]:
        engine = self.engine
        engine.calls.append(self.messages)
        if engine.fail_with is not None and engine.fail_after is None:
            raise engine.fail_with
        words = engine.reply_for(self.messages).split(" ")
        cut = len(words) > self.params.max_new_tokens  # the budget ends the reply
        words = words[: self.params.max_new_tokens]
        sent: list[str] = []
        try:
            for i, word in enumerate(words):
                if self.cancelled.is_set():
                    break
                if engine.fail_with is not None and i == engine.fail_after:
                    raise engine.fail_with
                if engine.word_delay:
                    time.sleep(engine.word_delay)
                sent.append(word)
                yield word if i == 0 else " " + word
        finally:
            if len(sent) < len(words):
                self.cancelled.set()
            self.result = Generation(
                text=" ".join(sent),
                prompt_tokens=engine.count_tokens(self.messages),
                completion_tokens=len(sent),
                ttft_ms=5,
                total_ms=20,
                finish_reason=(
                    FinishReason.CANCELLED
                    if self.cancelled.is_set()
                    else FinishReason.LENGTH
                    if cut
                    else FinishReason.STOP
                ),
            )


class FakeEngine(ChatEngine):
    """Counts a token per word and echoes the last user message; can be told to fail, to fail
    part-way (`fail_after` words), to write slowly (`word_delay` seconds a word), or to say it is
    not ready (`ready`)."""

    model_name = "fake-echo"

    def __init__(self, *, context_window: int = 4096, fail_with: Exception | None = None):
        self.window = context_window
        self.fail_with = fail_with
        self.fail_after: int | None = None
        self.word_delay = 0.0
        self.calls: list[list[ChatMessage]] = []
        self.replies: list[str] = []  # replies to give, in order, before echoing
        self.forgotten: list[str] = []  # conversations whose cached turns were dropped
        self.ready = True  # what is_ready() answers (a test sets it False)
        self.in_flight = InFlight()  # streams being read

    def load(self) -> None:
        pass

    def is_ready(self) -> bool:
        return self.ready

    def queue_depth(self) -> int:
        return self.in_flight.count

    def prompt_budget(self, params: GenerationParams) -> int:
        return self.window - params.max_new_tokens

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m["content"].split()) + 2 for m in messages)

    def reply_for(self, messages: list[ChatMessage]) -> str:
        if self.replies:
            return self.replies.pop(0)
        return f"Echo: {messages[-1]['content']}"

    def stream(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> FakeStream:
        return FakeStream(self, messages, params)

    def score_reply(self, messages: list[ChatMessage], reply: str) -> float:
        """Minus one for each word of the reply that the messages do not hold."""
        said = {word for m in messages for word in m["content"].lower().split()}
        return -float(sum(word not in said for word in reply.lower().split()))

    def forget(self, conversation: str) -> Future[None]:
        self.forgotten.append(conversation)
        return already_done()


if TYPE_CHECKING:  # the type checker holds the fake to the whole seam (none left abstract)
    _: ChatEngine = FakeEngine()
