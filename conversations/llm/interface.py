"""What the web side needs from an engine: the seam between Django and the generation layer.

Importing this module imports no torch and no Django.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: int
    total_ms: int
    finish_reason: FinishReason
