"""The one owner of the model in a process: it loads lazily, counts tokens, generates and scores.
It is what the web side's seam (interface.ChatEngine) is, in the server's own process.

What writes replies depends on the model (backends.py): Llama-architecture models (the bundled
SmolLM2 among them) run on the lean decoder, whose replies share batched decode steps; other
models, seq2seq ones included, run through transformers' `generate`, one reply at a time.
Either way every torch call happens on the scheduler's one model thread.

Messages come in as chat messages, [{"role": "system" | "user" | "assistant", "content": ...}],
and become the model's prompt as its kind reads them (prompts.py).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Hashable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import Backend, DecoderBackend, GenerateBackend, ReplyJob, Running
from .events import ReplyEnded, TokensWritten
from .in_flight import InFlight
from .interface import ChatEngine, ChatMessage, FinishReason, Generation, GenerationParams
from .loading import LoadedModel, describe_source, load_model
from .prefix_cache import PrefixCache, owner_of
from .prompts import ChatTemplate, JoinedTurns, Prompt
from .scheduler import Scheduler
from .tokens import ID_BYTES, PromptTokenizer, Recent, ReplyText, prompt_bytes

if TYPE_CHECKING:
    from .decoder import LlamaDecoder

__all__ = ["Engine", "Generation", "GenerationParams", "ReplyStream"]

# Prompt encodings remembered (see Engine.prompt): at most this many, in at most half the
# engine's `token_cache_bytes` (the chat template's tokens.PromptTokenizer has the other half).
ENCODINGS_KEPT = 16

logger = logging.getLogger(__name__)
# A message list as a key: (role, content) pairs.
Messages = tuple[tuple[str, str], ...]


class ReplyStream:
    """One reply being written. Iterate it for pieces of text as the model writes them; once
    iteration ends (finished, cancelled, or abandoned by the consumer), `result` holds the
    Generation. `cancel()` stops the model within one decoding step."""

    def __init__(
        self,
        engine: Engine,
        messages: list[ChatMessage],
        params: GenerationParams,
        cache_key: Hashable | None = None,
        owner: str | None = None,
    ) -> None:
        self.engine = engine
        self.messages = messages
        self.params = params
        self.cache_key = cache_key
        self.owner = owner if owner is not None else owner_of(cache_key)
        self.cancelled = threading.Event()
        self.result: Generation | None = None
        self._running: Running | None = None
        self._text: ReplyText | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return self._running.reused_tokens if self._running is not None else 0

    @property
    def token_ids(self) -> list[int]:
        """The ids the reply is written in, so far (its stop token included)."""
        return list(self._text.ids) if self._text is not None else []

    def __iter__(self) -> Iterator[str]:
        with self.engine.in_flight:
            yield from self._pieces()

    def _pieces(self) -> Iterator[str]:
        engine, cancelled = self.engine, self.cancelled
        backend = engine.backend
        prompt = engine.prompt(self.messages)
        input_ids = list(prompt.ids)
        budget = engine.reply_budget(self.params)
        running = self._running = backend.start(
            ReplyJob(input_ids, self.params, budget, cancelled, self.cache_key, self.owner)
        )

        started = time.perf_counter()
        first_at: float | None = None
        finished: float | None = None
        text = self._text = ReplyText(backend.loaded.tokenizer)  # (its `ids`: the tokens so far)
        try:
            while True:
                # (isinstance, not match: a class pattern measured ten times slower, per token)
                event = running.events.get()
                if isinstance(event, TokensWritten):
                    first_at = first_at or event.at
                    if piece := text.add(event.ids):
                        yield piece
                elif isinstance(event, ReplyEnded):
                    finished = event.at
                    break
                else:  # ReplyFailed
                    raise event.error
        finally:
            if finished is None:  # the consumer left early, or the model failed
                cancelled.set()
            running.wait()
            finished = finished or time.perf_counter()
            written: list[int] = text.ids
            stopped = bool(written) and written[-1] in backend.stop_ids
            self.result = self._result(
                written, stopped, len(input_ids), budget, started, first_at, finished
            )
            # The next turn's prompt holds the ids written here.
            backend.prompts.remember(prompt, written[:-1] if stopped else written, self.result.text)

    def _result(
        self,
        tokens: list[int],
        stopped: bool,
        prompt_tokens: int,
        budget: int,
        started: float,
        first_at: float | None,
        finished: float,
    ) -> Generation:
        if stopped or (not self.cancelled.is_set() and len(tokens) < budget):
            reason = FinishReason.STOP
        elif self.cancelled.is_set():
            reason = FinishReason.CANCELLED
        else:
            reason = FinishReason.LENGTH
        text: str = self.engine.load().tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(
            text=text.strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            ttft_ms=round(((first_at or finished) - started) * 1000),
            total_ms=round((finished - started) * 1000),
            finish_reason=reason,
        )


class Engine(ChatEngine):
    """Loads the configured model on first use and serves generation requests on one model
    thread, several replies per decode step when the decoder runs the model."""

    def __init__(
        self,
        *,
        model: str = "",
        cache_dir: Path | str,
        context_tokens: int = 0,
        torch_threads: int = 0,
        prefix_cache_bytes: int = 256 * 2**20,
        batch_bytes: int = 512 * 2**20,
        token_cache_bytes: int = 32 * 2**20,
        weights: str = "int4",
        max_batch: int = 8,
        native_kernels: bool | str = True,
        shared_system_prompt: str | None = None,
    ) -> None:
        self.model_setting = model
        self.cache_dir = Path(cache_dir)
        self.context_tokens = context_tokens
        self.torch_threads = torch_threads
        self.prefix_cache_bytes = prefix_cache_bytes
        self.batch_bytes = batch_bytes
        self.token_cache_bytes = token_cache_bytes
        self.weights = weights
        self.max_batch = max_batch
        self.native_kernels = native_kernels
        self.shared_system_prompt = shared_system_prompt
        self._prefix_cache = PrefixCache(prefix_cache_bytes)
        self._model_name = describe_source(model)
        # Set by loading: what writes replies on the model. The scheduler's one thread runs
        # every torch call, loading included: decoding measured 40% slower when torch had run
        # on another thread of the process.
        self._backend: Backend | None = None
        self._load_lock = threading.Lock()
        self._encoded: Recent[Messages, Prompt] = Recent(ENCODINGS_KEPT, token_cache_bytes // 2)
        self._encoded_lock = threading.Lock()
        self._scheduler = Scheduler(None, self._prefix_cache, max(1, max_batch))
        self.in_flight = InFlight()  # replies being read: waiting for the model or written

    @property
    def model_name(self) -> str:
        return self._model_name

    # Loading

    def load(self) -> LoadedModel:
        """Load the model once; concurrent callers wait for the same load."""
        return self.backend.loaded

    @property
    def backend(self) -> Backend:
        """What writes replies on the loaded model (loads it). The model thread does the
        loading: every torch call of the process stays on that one thread."""
        if self._backend is None:
            with self._load_lock:
                if self._backend is None:
                    self._backend = self._scheduler.call(self._load_on_model_thread).result()
        return self._backend

    def _load_on_model_thread(self) -> Backend:
        import torch

        from . import decoder

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        loaded = load_model(self.model_setting, self.cache_dir)
        if loaded.is_seq2seq:
            return GenerateBackend(loaded, self._scheduler, JoinedTurns(loaded.tokenizer))
        prompts = ChatTemplate(loaded.tokenizer, max_bytes=self.token_cache_bytes // 2)
        if not decoder.supports(loaded.model):
            return GenerateBackend(loaded, self._scheduler, prompts)
        backend = DecoderBackend(
            loaded,
            self._scheduler,
            prompts,
            self._prefix_cache,
            fmt=self.weights,
            limit=self._window(loaded),
            slot_bytes=self.batch_bytes,
            kernels=self.cache_dir if str(self.native_kernels).lower() != "false" else None,
            kernel_set=str(self.native_kernels).lower(),
        )
        backend.share_system_prompt(self.shared_system_prompt)
        _return_freed_memory()
        return backend

    @property
    def is_loaded(self) -> bool:
        return self._backend is not None

    def is_ready(self) -> bool:
        """Whether the model is loaded (by a reply, or by the worker's warm-up at start); asking
        loads nothing."""
        return self.is_loaded

    def queue_depth(self) -> int:
        """Replies whose stream is being read: waiting for the model thread or being written."""
        return self.in_flight.count

    # What the model runs on (read by tests)

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefix_cache

    @property
    def decoder(self) -> LlamaDecoder | None:
        """The lean decoder running the model (None: the model runs through `generate`)."""
        backend = self.backend
        return backend.decoder if isinstance(backend, DecoderBackend) else None

    @property
    def prompt_tokenizer(self) -> PromptTokenizer | None:
        """A chat model's prompt tokenizer (None: a seq2seq model, whose turns are joined)."""
        prompts = self.backend.prompts
        return prompts.encoder if isinstance(prompts, ChatTemplate) else None

    @property
    def encodings(self) -> Recent[Messages, Prompt]:
        """The last prompts' encodings, by their messages (see prompt())."""
        return self._encoded

    @property
    def stop_ids(self) -> frozenset[int]:
        """The tokens that end the model's turn."""
        return self.backend.stop_ids

    # Sizes

    def context_window(self) -> int:
        """How many tokens the model reads: the model's own limit unless the setting lowers it."""
        return self._window(self.load())

    def _window(self, loaded: LoadedModel) -> int:
        config = loaded.model.config
        own: int = getattr(config, "max_position_embeddings", None) or 2048
        if self.context_tokens > 0:
            return min(own, self.context_tokens)
        return own

    def reply_budget(self, params: GenerationParams) -> int:
        """Tokens set aside for the reply: max_new_tokens, but never more than the window
        allows (half of it for a causal model, so that it still reads the message it answers)."""
        return self.backend.prompts.reply_budget(params, self.context_window())

    def prompt_budget(self, params: GenerationParams) -> int:
        """Tokens left for the prompt once the reply budget is set aside."""
        return self.backend.prompts.prompt_budget(params, self.context_window())

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt tokens for these messages, as the model will see them."""
        return len(self.prompt(messages).ids)

    def encode(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt's token ids."""
        return list(self.prompt(messages).ids)

    def prompt(self, messages: list[ChatMessage]) -> Prompt:
        """The prompt for these messages, rendered and tokenized. The last few are remembered:
        the server counts a message list's tokens to fit the context and then generates from
        the same list, and tokenizing a long history costs milliseconds."""
        key = tuple((m["role"], m["content"]) for m in messages)
        with self._encoded_lock:
            known = self._encoded.get(key)
        if known is not None:
            return known
        prompt = self.backend.prompts.render(messages)
        with self._encoded_lock:
            self._encoded.put(key, prompt, encoding_bytes(key, prompt))
        return prompt

    # Generation

    def stream(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        *,
        cache_key: Hashable | None = None,
        owner: str | None = None,
    ) -> ReplyStream:
        """The assistant's next turn for these messages, as a stream of text pieces. With a
        `cache_key` (a conversation and its owner), the keys and values of the turn are kept,
        and the next turn with the same key recomputes only the tokens that differ from this
        one's (on the lean decoder; models served by `generate` recompute everything). A new
        conversation reuses only its owner's and what every user shares. `owner` (a user; by
        default the cache key's) is whose reply it is: replies waiting for the model are let in
        owner by owner."""
        return ReplyStream(self, messages, params, cache_key, owner)

    def forget(self, conversation: str) -> futures.Future[None]:
        """Drop the keys and values kept for a conversation (it, or some of its messages, was
        deleted). Returns the Future of the model thread doing it."""

        def matches(key: object) -> bool:
            return bool(getattr(key, "conversation", key) == conversation)

        scheduler = self._scheduler
        done: futures.Future[None] = scheduler.call(lambda: scheduler.forget(matches))
        return done

    def score_reply(self, messages: list[ChatMessage], reply: str) -> float:
        backend = self.backend
        prompt_ids = self.encode(messages)
        reply_ids = backend.loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]
        return backend.score(prompt_ids, reply_ids)


def encoding_bytes(key: Messages, prompt: Prompt) -> int:
    """An encoding's memory, about: its messages, and its prompt with its ids."""
    contents = sum(sys.getsizeof(content) for _, content in key)
    return contents + prompt_bytes(prompt.text or "", prompt.ids, per_token=ID_BYTES)


def _return_freed_memory() -> None:
    """Hand the memory freed while loading back to the system (glibc keeps it otherwise: some
    hundreds of MB after converting the weights). Elsewhere, nothing to do."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
