"""The model thread: the one thread that runs the model, for every conversation at once.

Replies being written share decode steps: each step feeds every active reply one token in one
batched forward pass (see decoder.py), so eight conversations cost little more than one. A new
reply joins between steps: its prompt is fed in chunks between two decode steps, together with
the chunks of other replies joining, so a long prompt does not stall the replies already
streaming. A reply leaves when it ends, runs out of budget or is cancelled; cancelling takes
effect before the next step.

When the last reply in flight ends, its conversation's keys and values stay where they are, in
slot row 0 ("parked"; see slot_rows.py). Tokens are chosen by sampling.py.

Other model work (scoring, or `generate` for models the decoder does not run) is handed to the
same thread as plain calls, run between steps.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any, NamedTuple

from . import sampling
from .events import ReplyEnded, ReplyFailed, TokensWritten
from .prefix_cache import PrefixCache
from .reply_request import ReplyRequest
from .slot_rows import SlotRows

if TYPE_CHECKING:
    import torch

    from .decoder import LlamaDecoder

logger = logging.getLogger(__name__)

# A prompt is fed in chunks of at most PREFILL_CHUNK tokens, and one pass between two decode
# steps feeds at most PREFILL_TOKENS of prompts in all: a long prompt does not stall the replies
# being written for long.
PREFILL_CHUNK = 256
PREFILL_TOKENS = 512
# Prompts read in one pass are padded to the longest (decoder.prefill_many): runs of very
# different lengths go in separate passes, so that a pass computes at most this many times the
# tokens it feeds.
PREFILL_PADDING = 1.5
# Slot tensors of several rows holding more than this are freed once no reply has been in
# flight for IDLE_SECONDS: a burst of conversations that pauses for a moment (eight replies
# ending, eight follow-ups arriving) keeps them, rather than giving back ~100 MB and then
# allocating and zeroing them again.
IDLE_BYTES = 64 * 2**20
IDLE_SECONDS = 2.0
# While several replies are written, each one's tokens are handed over at most this often (a
# reply's first and last at once): every hand-over wakes a server thread, which then competes
# with the model for the two cores. One reply alone gets every token as it comes.
DELIVERY_SECONDS = 0.05


class Posted(NamedTuple):
    """What another thread hands the model thread: a reply to write (`payload` a ReplyRequest,
    no future), or a call (`payload` the function, `future` for its result)."""

    kind: str  # "reply" or "call"
    payload: Any
    future: futures.Future | None


class Scheduler:
    def __init__(self, decoder: LlamaDecoder | None, prefix_cache: PrefixCache, max_batch: int):
        self.prefix_cache = prefix_cache
        # The replies in flight, in the order of the slot rows they hold.
        self._rows = SlotRows(prefix_cache)
        # The decoder may come later (the engine loads the model on this thread, then sets it).
        self.decoder = decoder
        self.max_batch = max_batch
        self._inbox: deque[Posted] = deque()
        self._wakeup = threading.Condition()
        self._waiting: deque[ReplyRequest] = deque()
        # When each owner with replies waiting or in flight last had one let in (see _admit).
        self._admitted: dict[str | None, int] = {}
        self._admissions = 0
        self.steps = 0  # decode steps run (read by tests)
        self.widest = 0  # the most rows one step has fed
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    @property
    def decoder(self) -> LlamaDecoder | None:
        return self._decoder

    @decoder.setter
    def decoder(self, decoder: LlamaDecoder | None) -> None:
        self._decoder = decoder
        self._rows.cache = decoder.cache if decoder is not None else None

    # Called from any thread

    def call(self, function: Callable):
        """Run `function()` on the model thread; returns a Future of its result."""
        future: futures.Future = futures.Future()
        self._post(Posted("call", function, future))
        return future

    def stop(self, timeout: float = 5.0) -> None:
        """End the model thread once it has finished what it is doing (called at exit: a thread
        that wakes up, or comes back from torch, while the interpreter shuts down aborts the
        process)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: ReplyRequest) -> None:
        self._post(Posted("reply", request, None))

    @property
    def uncollected(self) -> int:
        """How many replies and calls are posted that the model thread has not taken yet."""
        with self._wakeup:
            return len(self._inbox)

    @property
    def parked_key(self) -> str | None:
        """The cache key of the conversation parked in slot row 0 (None: nothing is parked). As
        of a moment: the model thread changes it."""
        parked = self._rows.parked  # (read once: the model thread may set it meanwhile)
        return parked[0] if parked is not None else None

    def is_alive(self) -> bool:
        """Whether the model thread is still running (it ends once `stop` is called)."""
        return self._thread.is_alive()

    def _post(self, item: Posted) -> None:
        with self._wakeup:
            self._inbox.append(item)
            self._wakeup.notify()

    @property
    def spare_row(self) -> int:
        """A slot row no reply holds (for a call on the model thread to use meanwhile)."""
        self._rows.unpark()
        return len(self._rows)

    # The model thread

    def _run(self) -> None:
        import torch  # here, so that importing this module (and the engine) imports no torch

        with torch.inference_mode():
            while not self._stopping:
                idle = not self._rows and not self._waiting
                timeout = IDLE_SECONDS if self._idle_memory else None
                if not self._collect(block=idle, timeout=timeout):
                    self._rows.free()  # nothing came for a while: a burst is over, its memory goes
                    continue
                if self.decoder is None or self._stopping:
                    continue  # no model yet (only calls come), or the thread ends
                try:
                    self._admit()
                    self._drop_cancelled()
                    self._prefill_step()
                    self._decode_step()
                except Exception as exc:  # every reply in flight hears of it
                    logger.exception("The model failed; the replies in flight end with an error")
                    for request in list(self._rows):
                        self._finish(request, error=exc)
                self._retire()

    @property
    def _idle_memory(self) -> bool:
        """Whether the slot tensors are worth giving back: several rows, more than IDLE_BYTES.
        (One row stays: it is the parked conversation, at most one context window long.)"""
        cache = self.decoder.cache if self.decoder is not None else None
        return cache is not None and cache.rows > 1 and cache.nbytes > IDLE_BYTES

    def _collect(self, *, block: bool, timeout: float | None = None) -> bool:
        """Take what was posted; with `block`, wait for something first. False if it waited
        `timeout` seconds for nothing."""
        with self._wakeup:
            while block and not self._inbox and not self._stopping:
                if not self._wakeup.wait(timeout) and not self._inbox and not self._stopping:
                    return False
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if item.kind == "reply":
                self._waiting.append(item.payload)
            elif item.future is not None and item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.payload())
                except BaseException as exc:  # handed to the caller
                    item.future.set_exception(exc)
        return True

    def _admit(self) -> None:
        admitted = []
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            self._finish(request)
        while self._waiting and len(self._rows) < self.max_batch:
            request = self._next_waiting()
            if not self._rows.fits_with(request):
                break  # it waits for rows to leave: the slot tensor stays within its bytes
            self._waiting.remove(request)
            self._admissions += 1
            self._admitted[request.owner] = self._admissions
            self._rows.give_row(request)
            admitted.append(request)
        if admitted:
            self._rows.make_room(admitted)

    def _next_waiting(self) -> ReplyRequest:
        """The waiting reply to let in next: one user's many replies do not hold the model for
        everyone. The owner with the fewest replies in flight goes first, among equals the one
        whose last reply was let in longest ago (round-robin); an owner's replies in the order
        they came."""
        owners = {r.owner for r in self._waiting} | {r.owner for r in self._rows}
        for owner in [o for o in self._admitted if o not in owners]:
            del self._admitted[owner]  # (gone: remembered no longer)
        running = Counter(r.owner for r in self._rows)
        return min(
            self._waiting,
            key=lambda r: (running[r.owner], self._admitted.get(r.owner, 0)),
        )  # (min keeps the first of equals: the earliest of an owner's replies)

    def _drop_cancelled(self) -> None:
        """Cancelling takes effect here, before the next pass."""
        for request in self._rows:
            if request.cancelled.is_set():
                self._finish(request)

    def _prefill_step(self) -> None:
        """Feed each reply still reading its prompt (it has no token chosen yet) its next chunk
        (at most PREFILL_TOKENS in all), in one pass, or a few if their lengths differ much; a
        reply whose prompt is read chooses its first token."""
        reading = []  # (request, run)
        budget = PREFILL_TOKENS
        for request in self._rows:
            if request.pending is not None or request.finished or budget <= 0:
                continue
            chunk = request.prompt[request.filled : request.filled + min(PREFILL_CHUNK, budget)]
            reading.append((request, (request.row, chunk, request.filled)))
            budget -= len(chunk)
        for group in _similar_lengths(reading):
            logits = self.decoder.prefill_many([run for _, run in group])
            done = []
            for i, (request, (_, chunk, _)) in enumerate(group):
                request.filled += len(chunk)
                if request.filled == len(request.prompt):
                    done.append(i)
            if done:
                self._choose([group[i][0] for i in done], logits[done])

    def _decode_step(self) -> None:
        decoding = [r for r in self._rows if r.pending is not None and not r.finished]
        if not decoding:
            return
        # Rows 0..n-1 go through the step together. A row still reading its prompt is fed a
        # placeholder at its next free position, which its next chunk overwrites.
        tokens = [r.pending if r.pending is not None else 0 for r in self._rows]
        positions = [r.filled for r in self._rows]
        logits = self.decoder.decode(tokens, positions)
        self.steps += 1
        self.widest = max(self.widest, len(self._rows))
        for request in decoding:
            request.filled += 1
        rows = [request.row for request in decoding]
        # (Usually every row is decoding, in order: then no copy of the logits.)
        self._choose(decoding, logits if rows == list(range(len(logits))) else logits[rows])

    def _choose(self, requests: list[ReplyRequest], logits: torch.Tensor) -> None:
        """Pick each request's next token from its row of `logits` and hand it over."""
        now = time.perf_counter()
        for request, token in zip(requests, sampling.next_tokens(requests, logits), strict=True):
            request.generated.append(token)
            request.pending = token
            request.unsent.append(token)
            if token in request.stop_ids or len(request.generated) >= request.max_new_tokens:
                self._finish(request)
            elif len(self._rows) == 1 or now >= request.next_delivery:
                self._deliver(request, now)

    def _deliver(self, request: ReplyRequest, now: float) -> None:
        request.events.put(TokensWritten(request.unsent, now))
        request.unsent = []
        request.next_delivery = now + DELIVERY_SECONDS

    def _finish(self, request: ReplyRequest, error: BaseException | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        # What the row computed is kept for the conversation's next turn (see _retire).
        request.keep = (
            error is None
            and request.row >= 0
            and request.cache_key is not None
            and self.prefix_cache.max_bytes > 0
        )
        now = time.perf_counter()
        if request.unsent:
            self._deliver(request, now)
        request.events.put(ReplyFailed(error, now) if error is not None else ReplyEnded(now))
        if request.row < 0:
            request.done.set()

    def _retire(self) -> None:
        """Let go of finished rows, moving the last row into each freed one. The last reply to
        leave parks its conversation in row 0; the others' rows go to the prefix cache."""
        finished = [r for r in self._rows if r.finished]
        for request in finished:
            self._rows.release(request, park=len(self._rows) == 1 and not self._waiting)
            request.done.set()
        if finished:
            self._rows.trim()

    def forget(self, matches: Callable[[object], bool]) -> None:
        """Drop the keys and values kept under the cache keys that `matches` (on the model
        thread): the prefix cache's, the parked row's, and what the replies in flight would
        keep when they end."""
        self.prefix_cache.discard_where(matches)
        self._rows.forget(matches)
        for request in [*self._rows, *self._waiting]:
            if request.cache_key is not None and matches(request.cache_key):
                request.cache_key = None


def _similar_lengths(runs: list[tuple]) -> list[list[tuple]]:
    """(request, run) pairs grouped into passes, longest runs first: a run joins the pass
    being formed while the pass, padded to its longest run, stays within PREFILL_PADDING times
    the tokens it feeds."""
    groups: list[list[tuple]] = []
    fed = longest = 0
    for pair in sorted(runs, key=lambda pair: -len(pair[1][1])):
        length = len(pair[1][1])
        if groups and (len(groups[-1]) + 1) * longest <= PREFILL_PADDING * (fed + length):
            groups[-1].append(pair)
            fed += length
        else:
            groups.append([pair])
            fed = longest = length
    return groups
