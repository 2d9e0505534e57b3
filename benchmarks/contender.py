"""A contender in a process of its own: `python -m benchmarks.contender engine|reference`.

Reads one JSON request per stdin line and answers with one JSON line on stdout (see workers.py):

- {"op": "generate", "messages", "max_new_tokens", ...}: a whole reply, timed;
- {"op": "first_token", "messages", "max_new_tokens"}: seconds from the call to the first token;
- {"op": "score", "messages", "text"}: summed log-probability of `text` as the reply;
- {"op": "count_tokens", "messages"}: prompt tokens (engine).

"engine" is the product's engine, used only through its public interface (Engine.generate,
stream, count_tokens, score_reply) with the server's default generation parameters, so this
measures whatever the engine becomes. Like the server, it names the conversation each call
belongs to ("conversation" in the request; a new one per call when absent).

"reference" is plain transformers in fp32 on the same weights: the naive path that re-encodes and
prefills the whole conversation every time.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback
import uuid

from . import common


class EngineContender:
    def __init__(self) -> None:
        self.engine = common.engine()
        # The server names the conversation a reply belongs to (replies.py: cache_key), so that
        # an engine can keep per-conversation state; do the same when the engine takes it.
        self.takes_key = "cache_key" in inspect.signature(self.engine.stream).parameters

    def _key(self, conversation: str | None) -> dict:
        """The conversation a call belongs to: `conversation`, or a new one for each call."""
        return {"cache_key": conversation or uuid.uuid4().hex} if self.takes_key else {}

    def generate(self, messages, max_new_tokens, conversation=None, **_) -> dict:
        params = common.product_params(max_new_tokens=max_new_tokens)
        started = time.perf_counter()
        result = self.engine.generate(messages, params, **self._key(conversation))
        seconds = time.perf_counter() - started
        decode_seconds = (result.total_ms - result.ttft_ms) / 1000
        return {
            "tokens": result.completion_tokens,
            "seconds": seconds,
            "text": result.text,
            "ttft_ms": result.ttft_ms,
            "finish_reason": result.finish_reason,
            "decode_tokens_per_s": (result.completion_tokens - 1) / decode_seconds
            if result.completion_tokens > 1 and decode_seconds > 0
            else None,
            "params": params.as_dict(),
        }

    def first_token(self, messages, max_new_tokens, conversation=None) -> dict:
        """Seconds from the call to the first piece of text; the reply is then stopped."""
        params = common.product_params(max_new_tokens=max_new_tokens)
        started = time.perf_counter()
        stream = self.engine.stream(messages, params, **self._key(conversation))
        pieces = iter(stream)
        next(pieces, None)
        seconds = time.perf_counter() - started
        stream.cancel()
        for _ in pieces:
            pass
        return {
            "seconds": seconds,
            "reported_ttft_ms": getattr(stream.result, "ttft_ms", None),
            # Prompt tokens an engine with a prefix cache did not recompute (if it says).
            "reused_tokens": getattr(stream, "reused_tokens", None),
        }

    def score(self, messages, text) -> dict:
        return {"logprob": self.engine.score_reply(messages, text)}

    def count_tokens(self, messages) -> dict:
        return {"tokens": self.engine.count_tokens(messages)}


class ReferenceContender:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.model, self.tokenizer = common.reference_model()

    def _prompt(self, messages):
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        return encoded["input_ids"]

    def generate(
        self, messages, max_new_tokens, min_new_tokens=None, repetition_penalty=None, **_
    ) -> dict:
        """Plain `model.generate`, greedy. With min_new_tokens it writes that many tokens."""
        torch = self.torch
        options = {"do_sample": False, "max_new_tokens": max_new_tokens}
        if min_new_tokens:
            options["min_new_tokens"] = min_new_tokens
        if repetition_penalty:
            options["repetition_penalty"] = repetition_penalty
        started = time.perf_counter()
        prompt = self._prompt(messages)
        with torch.inference_mode():
            output = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        seconds = time.perf_counter() - started
        new = output[0, prompt.shape[1] :]
        return {
            "tokens": int(new.shape[0]),
            "seconds": seconds,
            "text": self.tokenizer.decode(new, skip_special_tokens=True).strip(),
        }

    def first_token(self, messages, **_) -> dict:
        """Re-encode the whole conversation, prefill it from scratch, pick the first token."""
        torch = self.torch
        started = time.perf_counter()
        prompt = self._prompt(messages)
        with torch.inference_mode():
            self.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False
            )
        return {"seconds": time.perf_counter() - started, "prompt_tokens": prompt.shape[1]}

    def score(self, messages, text) -> dict:
        """Summed log-probability of `text` as the reply, by one plain fp32 forward pass."""
        torch = self.torch
        prompt = self._prompt(messages)[0].tolist()
        reply = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + reply], dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()
        log_probs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        picked = log_probs.gather(1, torch.tensor(reply).unsqueeze(1))
        return {"logprob": float(picked.sum()), "tokens": len(reply)}


def main() -> None:
    kind = sys.argv[1]
    answers = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not break the protocol
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    contender = {"engine": EngineContender, "reference": ReferenceContender}[kind]()
    answers.write(json.dumps({"ready": kind, "load_seconds": time.perf_counter() - started}))
    answers.write("\n")
    answers.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            answer = getattr(contender, request.pop("op"))(**request)
        except Exception as exc:
            traceback.print_exc()
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
