"""Choosing each reply's next token from its row of a step's logits: transformers' repetition
penalty for all rows at once, then the most likely token or a draw through the reply's warpers.
(torch is imported where used: the engine imports this module before the model loads.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .reply_request import ReplyRequest


def next_tokens(requests: list[ReplyRequest], logits: torch.Tensor) -> list[int]:
    """The next token of each request, from its row of logits (rows x vocab), each also written
    into the request's history of tokens seen (the reply itself appends it to `generated`).

    The repetition penalty is transformers' (RepetitionPenaltyLogitsProcessor: a seen token's
    score is divided by the penalty, or multiplied when negative), computed for all rows at once,
    each with its own penalty, in place in `logits`; sampling rows then go through their warpers
    one by one."""
    import torch

    length = max(len(r.prompt) + len(r.generated) for r in requests)
    seen = torch.stack([_seen(request, length) for request in requests])
    penalties = torch.tensor([[r.repetition_penalty] for r in requests], dtype=logits.dtype)
    if (penalties != 1.0).any():
        scores = logits.gather(1, seen)
        scores = torch.where(scores < 0, scores * penalties, scores / penalties)
        logits.scatter_(1, seen, scores)
    # (max's indices are argmax's, first of equals first, and measured 3x faster.)
    tokens = logits.max(dim=-1).indices.tolist()
    for i, request in enumerate(requests):
        if request.samplers:
            scores = logits[i : i + 1]
            for sampler in request.samplers:
                scores = sampler(seen[i : i + 1], scores)
            tokens[i] = int(torch.multinomial(scores.softmax(dim=-1), 1))
    for request, token in zip(requests, tokens, strict=True):
        request.history[len(request.prompt) + len(request.generated)] = token
    return tokens


def _seen(request: ReplyRequest, length: int) -> torch.Tensor:
    """The request's tokens so far, padded to `length` with its first token (a repeat changes
    nothing for the penalty). Kept in a tensor that grows, so each step writes one token."""
    import torch

    if request.history is None or request.history.numel() < length:
        capacity = max(length, len(request.prompt) + request.max_new_tokens)
        history = torch.full((capacity,), request.prompt[0], dtype=torch.long)
        known = request.prompt + request.generated
        history[: len(known)] = torch.tensor(known, dtype=torch.long)
        request.history = history
    return request.history[:length]
