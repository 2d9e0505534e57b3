"""Replies of the real model whose tokens a test decides. The model still reads every token and
scores every step; the test picks what is written. A check of a mechanism (the keys and values of
a reply reused, a reply cut at its budget) then holds whatever words this CPU's rounding would
make the model choose: int4 and int8 products and bf16 attention round differently from one CPU
to another, and so does a greedy reply."""

from __future__ import annotations

import contextlib

import torch


class Steering:
    """A sampler (see backends.DecoderBackend.samplers) that writes `ids` in turn, or, without
    them, the model's most likely token other than those in `banned`. Each step's scores (after
    the repetition penalty) are kept in `scores`, the tokens written in `written`."""

    def __init__(self, ids: list[int] | None = None, banned: frozenset[int] = frozenset()):
        self.ids = ids
        self.banned = sorted(banned)
        self.scores: list[torch.Tensor] = []
        self.written: list[int] = []

    def __call__(self, seen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores[0].float().clone())
        if self.ids is not None:
            token = self.ids[len(self.written)]
        else:
            allowed = scores[0].clone()
            allowed[self.banned] = float("-inf")
            token = int(allowed.argmax())
        self.written.append(token)
        # Only this token left: drawing from these scores gives it.
        chosen = torch.full_like(scores, float("-inf"))
        chosen[:, token] = 0.0
        return chosen

    def stacked_scores(self) -> torch.Tensor:
        return torch.stack(self.scores)


@contextlib.contextmanager
def steered(engine, **steering):
    """Every reply `engine` starts in the block is written by a Steering(**steering) of its own;
    yields the list they are added to, in the order the replies start."""
    steerings: list[Steering] = []

    def samplers(params):
        steerings.append(Steering(**steering))
        return [steerings[-1]]

    backend = engine.backend
    backend.samplers = samplers
    try:
        yield steerings
    finally:
        del backend.samplers


def written_ids(stream) -> list[int]:
    """The ids a finished ReplyStream's reply was written in (its stop token included)."""
    return stream.token_ids
