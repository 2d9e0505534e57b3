"""One reply as the model thread holds it: what to write, where it stands, and the queue its
reader takes the model's events from. The scheduler, sampling and the slot rows all read it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .events import ModelEvent

if TYPE_CHECKING:
    import torch


@dataclass(eq=False)
class ReplyRequest:
    """One reply to write. The scheduler puts TokensWritten as it writes (see
    DELIVERY_SECONDS), then ReplyEnded or ReplyFailed on `events`, and sets `done` once it has
    let go of it."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    # The repetition penalty applies to every token of prompt and reply, as in `generate`. With
    # `samplers` (transformers' temperature and top-p warpers, in generate's order) the token is
    # drawn from the resulting distribution; without, it is the most likely one.
    repetition_penalty: float = 1.0
    samplers: list[Callable] = field(default_factory=list)
    cache_key: str | None = None
    # Whose reply it is (a user): waiting replies are let in user by user
    # (Scheduler._next_waiting).
    owner: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue[ModelEvent] = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # The scheduler's state
    row: int = -1
    filled: int = 0  # positions of the row that hold keys and values
    pending: int | None = None  # the last token chosen, fed at the next step
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # generated, not yet put on `events`
    next_delivery: float = 0.0
    history: torch.Tensor | None = None  # prompt + generated token ids (see sampling._seen)
    finished: bool = False
    keep: bool = False  # its keys and values are kept for the conversation's next turn

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated
