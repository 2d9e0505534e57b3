"""The one owner of the model in a process: it loads lazily, counts tokens, generates and scores.

Llama-architecture models (the bundled SmolLM2 among them) run on the lean decoder
(decoder.py), whose replies share batched decode steps (scheduler.py); other models, seq2seq
ones included, run through transformers' `generate`, one reply at a time. Either way every torch
call happens on the scheduler's one model thread.

Messages come in as chat messages, [{"role": "system" | "user" | "assistant", "content": ...}].
Causal chat models format them with their own chat template; seq2seq dialogue models
(Blenderbot) read the turns joined into one text, the way they were trained.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

from .events import ModelEvent, ReplyEnded, ReplyFailed, TokensWritten
from .interface import FinishReason, Generation, GenerationParams
from .loading import LoadedModel, describe_source, load_model
from .prefix_cache import CacheKey, PrefixCache, owner_of
from .scheduler import Scheduler
from .tokens import (
    ID_BYTES,
    SAMPLE_CONVERSATION,
    PromptTokenizer,
    Recent,
    ReplyText,
    prompt_bytes,
)

if TYPE_CHECKING:
    from .scheduler import ReplyRequest

__all__ = ["Engine", "Generation", "GenerationParams", "ReplyStream"]

# Used only for causal models whose tokenizer ships no chat template.
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Prompt encodings remembered (see Engine._prompt): at most this many, in at most half the
# engine's `token_cache_bytes` (tokens.PromptTokenizer has the other half).
ENCODINGS_KEPT = 16
# Blenderbot separates dialogue turns by two spaces.
SEQ2SEQ_TURN_SEPARATOR = "  "

logger = logging.getLogger(__name__)


class _TokenQueue:
    """A generate() streamer that hands each new token to the consuming thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ModelEvent] = queue.Queue()
        self._seen_prompt = False

    def put(self, value) -> None:
        # The first call carries the prompt (or the decoder start token): not part of the reply.
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.queue.put(TokensWritten(value.reshape(-1).tolist(), time.perf_counter()))

    def end(self) -> None:
        pass


class ReplyStream:
    """One reply being written. Iterate it for pieces of text as the model writes them; once
    iteration ends (finished, cancelled, or abandoned by the consumer), `result` holds the
    Generation. `cancel()` stops the model within one decoding step."""

    def __init__(
        self,
        engine: Engine,
        messages: list[dict],
        params: GenerationParams,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> None:
        self.engine = engine
        self.messages = messages
        self.params = params
        self.cache_key = cache_key
        self.owner = owner if owner is not None else owner_of(cache_key)
        self._request: ReplyRequest | None = None
        self.cancelled = threading.Event()
        self.result: Generation | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return self._request.reused_tokens if self._request is not None else 0

    def __iter__(self) -> Iterator[str]:
        from .scheduler import ReplyRequest

        engine, cancelled = self.engine, self.cancelled
        loaded = engine.load()
        prompt_text, input_ids = engine._prompt(self.messages)
        input_ids = list(input_ids)
        budget = engine.reply_budget(self.params)
        if engine._decoder is not None:
            self._request = ReplyRequest(
                prompt=input_ids,
                max_new_tokens=budget,
                stop_ids=frozenset(engine._stop_ids()),
                repetition_penalty=self.params.repetition_penalty,
                samplers=engine._samplers(self.params),
                cache_key=self.cache_key,
                owner=self.owner,
                cancelled=cancelled,
            )
            events = self._request.events
            engine._scheduler.submit(self._request)
            wait = self._request.done.wait
        else:
            streamer = _TokenQueue()
            events = streamer.queue
            config = engine._generation_config(self.params)
            job = engine._scheduler.call(lambda: self._generate(input_ids, config, streamer))
            wait = lambda: futures.wait([job])  # noqa: E731

        started = time.perf_counter()
        first_at = finished = None
        text = ReplyText(loaded.tokenizer)  # (its `ids`: the reply's tokens so far)
        try:
            while True:
                match events.get():
                    case TokensWritten(ids, at):
                        first_at = first_at or at
                        if piece := text.add(ids):
                            yield piece
                    case ReplyEnded(at):
                        finished = at
                        break
                    case ReplyFailed(error):
                        raise error
        finally:
            if finished is None:  # the consumer left early, or the model failed
                cancelled.set()
            wait()
            finished = finished or time.perf_counter()
            self.result = self._result(
                text.ids, len(input_ids), budget, started, first_at, finished
            )
            if prompt_text is not None:  # the next turn's prompt holds the ids written here
                engine._remember(prompt_text, input_ids, text.ids, self.result.text)

    def _generate(self, input_ids: list[int], config, streamer: _TokenQueue) -> None:
        """`generate`, for models the decoder does not run (on the model thread)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancelled = self.cancelled

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        try:
            # Cancelled before it began: nothing to generate, but the reader still hears the end.
            if not cancelled.is_set():
                with torch.inference_mode():
                    prompt = torch.tensor([input_ids], dtype=torch.long)
                    self.engine.load().model.generate(
                        input_ids=prompt,
                        attention_mask=torch.ones_like(prompt),
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                    )
        except BaseException as exc:
            streamer.queue.put(ReplyFailed(exc, time.perf_counter()))
        else:
            streamer.queue.put(ReplyEnded(time.perf_counter()))

    def _result(self, tokens, prompt_tokens, budget, started, first_at, finished) -> Generation:
        stopped = bool(tokens) and tokens[-1] in self.engine._stop_ids()
        if stopped or (not self.cancelled.is_set() and len(tokens) < budget):
            reason = FinishReason.STOP
        elif self.cancelled.is_set():
            reason = FinishReason.CANCELLED
        else:
            reason = FinishReason.LENGTH
        return Generation(
            text=self.engine.load().tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            ttft_ms=round(((first_at or finished) - started) * 1000),
            total_ms=round((finished - started) * 1000),
            finish_reason=reason,
        )


class Engine:
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
        native_kernels: bool = True,
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
        self.model_name = describe_source(model)
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        # The decoder is set by load() (None for models it does not run: they go through
        # `generate`). The scheduler's one thread runs every torch call, loading included:
        # decoding measured 40% slower when torch had run on another thread of the process.
        self._decoder = None
        self._encoded = Recent(ENCODINGS_KEPT, token_cache_bytes // 2)
        self._encoded_lock = threading.Lock()
        self._prompts: PromptTokenizer | None = None  # set by load() for chat models
        self._scheduler = Scheduler(None, self._prefix_cache, max(1, max_batch))

    # Loading

    def load(self) -> LoadedModel:
        """Load the model once; concurrent callers wait for the same load. The model thread
        does the loading: every torch call of the process stays on that one thread."""
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    self._scheduler.call(self._load_on_model_thread).result()
        return self._loaded

    def _load_on_model_thread(self) -> None:
        import torch

        from . import decoder

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        loaded = load_model(self.model_setting, self.cache_dir)
        if not loaded.is_seq2seq and not loaded.tokenizer.chat_template:
            loaded.tokenizer.chat_template = PLAIN_TRANSCRIPT_TEMPLATE
        if not loaded.is_seq2seq:
            self._prompts = _prompt_tokenizer(loaded.tokenizer, self.token_cache_bytes // 2)
        if not loaded.is_seq2seq and decoder.supports(loaded.model):
            self._decoder = decoder.LlamaDecoder(
                loaded.model,
                fmt=self.weights,
                limit=self._window(loaded),
                slot_bytes=self.batch_bytes,
                # fp32 shares the model's own tensors; other formats hold copies.
                release=self.weights != "fp32",
                calibration=self._prompts.encode(
                    loaded.tokenizer.apply_chat_template(decoder.CALIBRATION, tokenize=False)
                ),
                kernels=self.cache_dir if self.native_kernels else None,
            )
            self._scheduler.decoder = self._decoder
            self._share_system_prompt(loaded.tokenizer)
            _return_freed_memory()
        self._loaded = loaded

    def _share_system_prompt(self, tokenizer) -> None:
        """Compute the keys and values of what every conversation may start with (the
        template's header and the server's default system prompt) once, from that text alone,
        for every user's conversations to borrow (see prefix_cache.PrefixCache.take)."""
        if self.shared_system_prompt is None or self.prefix_cache_bytes <= 0:
            return
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "system", "content": self.shared_system_prompt}], tokenize=False
            )
        except Exception:  # a template without a system role: nothing is shared
            logger.info("The chat template refused a system prompt; no prefix is shared")
            return
        ids = self._prompts.encode(text)
        if ids:
            self._decoder.prefill(0, ids, 0)
            self._prefix_cache.share(ids, self._decoder.cache.export(0, len(ids)))
            self._decoder.cache.clear()

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    # Sizes

    def context_window(self) -> int:
        """How many tokens the model reads: the model's own limit unless the setting lowers it."""
        return self._window(self.load())

    def _window(self, loaded: LoadedModel) -> int:
        config = loaded.model.config
        own = getattr(config, "max_position_embeddings", None) or 2048
        if self.context_tokens > 0:
            return min(own, self.context_tokens)
        return own

    def reply_budget(self, params: GenerationParams) -> int:
        """Tokens set aside for the reply: max_new_tokens, but never more than half the window,
        so a model with a short window still reads the message it answers."""
        window = self.context_window()
        if self.load().is_seq2seq:
            # The decoder has positions of its own (as many as the encoder, at most).
            return min(params.max_new_tokens, window - 1)
        return min(params.max_new_tokens, window // 2)

    def prompt_budget(self, params: GenerationParams) -> int:
        """Tokens left for the prompt once the reply budget is set aside."""
        if self.load().is_seq2seq:
            # The encoder reads the prompt; the decoder writes the reply in its own positions.
            return self.context_window()
        return self.context_window() - self.reply_budget(params)

    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens for these messages, as the model will see them."""
        return len(self._encode(messages))

    # Generation

    def stream(
        self,
        messages: list[dict],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
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

    def generate(
        self,
        messages: list[dict],
        params: GenerationParams,
        *,
        cache_key: CacheKey | None = None,
        owner: str | None = None,
    ) -> Generation:
        """Write the assistant's next turn for these messages."""
        stream = self.stream(messages, params, cache_key=cache_key, owner=owner)
        for _ in stream:
            pass
        return stream.result

    def forget(self, conversation: str) -> futures.Future:
        """Drop the keys and values kept for a conversation (it, or some of its messages, was
        deleted). Returns the Future of the model thread doing it."""

        def matches(key) -> bool:
            return getattr(key, "conversation", key) == conversation

        return self._scheduler.call(lambda: self._scheduler.forget(matches))

    def score_reply(self, messages: list[dict], reply: str) -> float:
        """Log-probability (natural log, summed over tokens) that the model answers `reply`.

        Used to check what the model makes of a context without sampling from it.
        """
        import torch

        loaded = self.load()
        if loaded.is_seq2seq:
            raise NotImplementedError("Scoring is implemented for causal models.")
        prompt_ids = self._encode(messages)
        reply_ids = loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + reply_ids

        def forward():
            with torch.inference_mode():
                if self._decoder is not None:  # the kernels of a batched decode step
                    logits = self._decoder.prefill(self._scheduler.spare_row, ids, 0, every=True)
                else:
                    logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
                log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
                targets = torch.tensor(reply_ids, dtype=torch.long)
                return float(log_probs.gather(1, targets.unsqueeze(1)).sum())

        return self._scheduler.call(forward).result()

    # Internals

    def _encode(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids."""
        return list(self._prompt(messages)[1])

    def _prompt(self, messages: list[dict]) -> tuple[str | None, tuple[int, ...]]:
        """The prompt's text as the chat template renders it (None for a model without one)
        and its token ids. The last few are remembered: the server counts a message list's
        tokens to fit the context and then generates from the same list, and tokenizing a long
        history costs milliseconds."""
        key = tuple((m["role"], m["content"]) for m in messages)
        with self._encoded_lock:
            known = self._encoded.get(key)
        if known is not None:
            return known
        text, ids = self._tokenize(messages)
        with self._encoded_lock:
            self._encoded.put(key, (text, tuple(ids)), _encoding_bytes(key, text, ids))
        return text, tuple(ids)

    def _tokenize(self, messages: list[dict]) -> tuple[str | None, list[int]]:
        loaded = self.load()
        tokenizer = loaded.tokenizer
        if loaded.is_seq2seq:
            text = SEQ2SEQ_TURN_SEPARATOR.join(m["content"] for m in messages)
            return None, tokenizer(text)["input_ids"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, self._prompts.encode(text)

    def _remember(self, prompt: str, prompt_ids: list[int], written: list[int], text: str) -> None:
        """Let the next turn's prompt hold the ids the reply to `prompt` was written in (see
        tokens.PromptTokenizer.remember). Only ever a saving: should it fail, the reply is
        still whole and the next prompt is tokenized as usual."""
        if written and written[-1] in self._stop_ids():
            written = written[:-1]
        try:
            self._prompts.remember(prompt, prompt_ids, written, text)
        except Exception:
            logger.exception("Could not remember the ids of a reply; the next turn reads it again")

    def _stop_ids(self) -> set[int]:
        loaded = self.load()
        ids: set[int] = set()
        for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def _samplers(self, params: GenerationParams) -> list:
        """transformers' warpers for sampling with these parameters ([] for greedy), in the
        order `generate` chains them."""
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        if params.temperature <= 0:
            return []
        samplers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_p < 1.0:
            samplers.append(TopPLogitsWarper(params.top_p))
        return samplers

    def _generation_config(self, params: GenerationParams):
        import copy

        loaded = self.load()
        config = copy.deepcopy(loaded.model.generation_config)
        sample = params.temperature > 0
        config.update(
            max_new_tokens=self.reply_budget(params),
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=sorted(self._stop_ids()),
        )
        if config.pad_token_id is None:
            config.pad_token_id = loaded.tokenizer.pad_token_id or min(self._stop_ids())
        return config


def _encoding_bytes(key: tuple, text: str | None, ids) -> int:
    """An encoding's memory, about: its messages, and its prompt with its ids."""
    contents = sum(sys.getsizeof(content) for _, content in key)
    return contents + prompt_bytes(text or "", ids, per_token=ID_BYTES)


def _prompt_tokenizer(tokenizer, max_bytes: int) -> PromptTokenizer:
    """Prompt tokenization reusing the last prompts' ids, if this tokenizer allows (tokens.py)."""
    prompts = PromptTokenizer(tokenizer, max_bytes=max_bytes)
    try:
        sample = tokenizer.apply_chat_template(
            SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that refuses the sample (no system role, say)
        logger.info("The chat template refused the sample; prompts are tokenized whole")
        return prompts
    reply = next(m["content"] for m in SAMPLE_CONVERSATION if m["role"] == "assistant")
    if not prompts.check(sample, reply):
        logger.info("This tokenizer does not encode pieces alone; prompts are tokenized whole")
    return prompts


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
