"""What the model thread tells the reader of a reply, in order: its tokens as they are written
(one at a time, or a few together), then that it ended or that the model failed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokensWritten:
    ids: list[int]
    at: float  # time.perf_counter() when they were handed over


@dataclass(frozen=True, slots=True)
class ReplyEnded:
    at: float


@dataclass(frozen=True, slots=True)
class ReplyFailed:
    error: BaseException
    at: float


ModelEvent = TokensWritten | ReplyEnded | ReplyFailed
