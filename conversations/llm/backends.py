"""What writes replies on the loaded model, behind one small interface (Backend):

- DecoderBackend: Llama-architecture models (the bundled SmolLM2 among them) on the lean
  decoder (decoder.py), whose replies share batched decode steps (scheduler.py);
- GenerateBackend: other models, causal or seq2seq, through transformers' `generate`, one reply
  at a time.

Either way every torch call happens on the scheduler's one model thread, and a reply's reader
hears of it only through events (events.py). How the messages become the prompt is the
backend's `prompts` (prompts.py).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .events import ModelEvent, ReplyEnded, ReplyFailed, TokensWritten
from .interface import GenerationParams
from .loading import LoadedModel
from .prefix_cache import PrefixCache
from .prompts import ChatTemplate, PromptFormat
from .reply_request import ReplyRequest
from .scheduler import Scheduler

if TYPE_CHECKING:
    import torch

    from .decoder import LlamaDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyJob:
    """A reply to write: to the prompt `prompt` (token ids), at most `budget` tokens. It stops
    within a step once `cancelled` is set; `cache_key` and `owner` as in Engine.stream."""

    prompt: list[int]
    params: GenerationParams
    budget: int
    cancelled: threading.Event
    cache_key: Hashable | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Running:
    """A reply handed to the model thread: its events, in order, and a wait until the thread
    has let go of it."""

    events: queue.Queue[ModelEvent]
    wait: Callable[[], object]
    request: ReplyRequest | None = None  # (on the decoder: the scheduler's record of it)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return self.request.reused_tokens if self.request is not None else 0


class Backend(ABC):
    """Writes replies on a loaded model, and scores them; `prompts` makes its prompts."""

    def __init__(self, loaded: LoadedModel, scheduler: Scheduler, prompts: PromptFormat) -> None:
        self.loaded = loaded
        self.scheduler = scheduler
        self.prompts = prompts
        self.stop_ids = _stop_ids(loaded)

    @abstractmethod
    def start(self, job: ReplyJob) -> Running:
        """Hand the reply to the model thread."""

    @abstractmethod
    def score(self, prompt: list[int], reply: list[int]) -> float:
        """Log-probability (natural log, summed over tokens) that the model answers `reply`."""


class DecoderBackend(Backend):
    """Replies on the lean decoder, several per decode step (see scheduler.py)."""

    def __init__(
        self,
        loaded: LoadedModel,
        scheduler: Scheduler,
        prompts: ChatTemplate,
        prefix_cache: PrefixCache,
        *,
        fmt: str,
        limit: int,
        slot_bytes: int,
        kernels: Path | None,
        kernel_set: str = "true",
    ) -> None:
        from . import calibration, decoder

        super().__init__(loaded, scheduler, prompts)
        self.encoder = prompts.encoder
        self.prefix_cache = prefix_cache
        self.decoder: LlamaDecoder = decoder.LlamaDecoder(
            loaded.model,
            fmt=fmt,
            limit=limit,
            slot_bytes=slot_bytes,
            # fp32 shares the model's own tensors; other formats hold copies.
            release=fmt != "fp32",
            calibration=self.encoder.encode(
                loaded.tokenizer.apply_chat_template(calibration.CALIBRATION, tokenize=False)
            ),
            kernels=kernels,
            kernel_set=kernel_set,
        )
        scheduler.decoder = self.decoder

    def share_system_prompt(self, system_prompt: str | None) -> None:
        """Compute the keys and values of what every conversation may start with (the
        template's header and the server's default system prompt) once, from that text alone,
        for every user's conversations to borrow (see prefix_cache.PrefixCache.take)."""
        if system_prompt is None or self.prefix_cache.max_bytes <= 0:
            return
        try:
            text = self.loaded.tokenizer.apply_chat_template(
                [{"role": "system", "content": system_prompt}], tokenize=False
            )
        except Exception:  # a template without a system role: nothing is shared
            logger.info("The chat template refused a system prompt; no prefix is shared")
            return
        ids = self.encoder.encode(text)
        if ids:
            self.decoder.prefill(0, ids, 0)
            self.prefix_cache.share(ids, self.decoder.cache.export(0, len(ids)))
            self.decoder.cache.clear()

    def start(self, job: ReplyJob) -> Running:
        request = ReplyRequest(
            prompt=job.prompt,
            max_new_tokens=job.budget,
            stop_ids=self.stop_ids,
            repetition_penalty=job.params.repetition_penalty,
            samplers=self.samplers(job.params),
            cache_key=job.cache_key,  # type: ignore[arg-type]  # (any hashable key; typed as str)
            owner=job.owner,
            cancelled=job.cancelled,
        )
        self.scheduler.submit(request)
        return Running(request.events, request.done.wait, request)

    def samplers(self, params: GenerationParams) -> list[Callable[..., Any]]:
        """transformers' warpers for sampling with these parameters ([] for greedy), in the
        order `generate` chains them."""
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        if params.temperature <= 0:
            return []
        samplers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_p < 1.0:
            samplers.append(TopPLogitsWarper(params.top_p))
        return samplers

    def score(self, prompt: list[int], reply: list[int]) -> float:
        import torch

        def forward() -> float:
            with torch.inference_mode():  # the kernels of a batched decode step
                ids = prompt + reply
                logits = self.decoder.score(self.scheduler.spare_row, ids, 0)
                return _log_likelihood(logits, len(prompt), reply)

        return float(self.scheduler.call(forward).result())


class GenerateBackend(Backend):
    """Replies through transformers' `generate`, one at a time, for models the decoder does
    not run: other causal models, and seq2seq ones."""

    def start(self, job: ReplyJob) -> Running:
        streamer = _TokenQueue()
        config = self._generation_config(job.params, job.budget)
        running = self.scheduler.call(lambda: self._generate(job, config, streamer))
        return Running(streamer.queue, lambda: futures.wait([running]))

    def score(self, prompt: list[int], reply: list[int]) -> float:
        import torch

        if self.loaded.is_seq2seq:
            raise NotImplementedError("Scoring is implemented for causal models.")

        def forward() -> float:
            with torch.inference_mode():
                ids = torch.tensor([prompt + reply])
                logits = self.loaded.model(input_ids=ids).logits[0].float()
                return _log_likelihood(logits, len(prompt), reply)

        return float(self.scheduler.call(forward).result())

    def _generate(self, job: ReplyJob, config: Any, streamer: _TokenQueue) -> None:
        """`generate` (on the model thread)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancelled = job.cancelled

        class StopWhenCancelled(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        try:
            # Cancelled before it began: nothing to generate, but the reader still hears the end.
            if not cancelled.is_set():
                with torch.inference_mode():
                    ids = torch.tensor([job.prompt], dtype=torch.long)
                    self.loaded.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                    )
        except BaseException as exc:
            streamer.queue.put(ReplyFailed(exc, time.perf_counter()))
        else:
            streamer.queue.put(ReplyEnded(time.perf_counter()))

    def _generation_config(self, params: GenerationParams, budget: int) -> Any:
        loaded = self.loaded
        config = copy.deepcopy(loaded.model.generation_config)
        sample = params.temperature > 0
        config.update(
            max_new_tokens=budget,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=sorted(self.stop_ids),
        )
        if config.pad_token_id is None:
            config.pad_token_id = loaded.tokenizer.pad_token_id or min(self.stop_ids)
        return config


class _TokenQueue:
    """A generate() streamer that hands each new token to the reply's reader."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ModelEvent] = queue.Queue()
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        # The first call carries the prompt (or the decoder start token): not part of the reply.
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.queue.put(TokensWritten(value.reshape(-1).tolist(), time.perf_counter()))

    def end(self) -> None:
        pass


def _stop_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


def _log_likelihood(logits: torch.Tensor, prompt_length: int, reply: list[int]) -> float:
    """The summed log-probability of `reply`, from the logits of every position of prompt and
    reply."""
    import torch

    log_probs = torch.log_softmax(logits[prompt_length - 1 : -1], dim=-1)
    targets = torch.tensor(reply, dtype=torch.long)
    return float(log_probs.gather(1, targets.unsqueeze(1)).sum())
