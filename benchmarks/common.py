"""What the benchmarks share: paths, the bundled model, prompts and small timing helpers."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench"

# A prompt that makes every contender write a long answer, so all of them reach ~128 tokens.
LONG_PROMPT = "Write a long story about a lighthouse keeper."
SYSTEM_PROMPT = "You are a helpful AI assistant."


def setup_django() -> None:
    """Django settings in this process: the engine is built from them, as the server builds it,
    and the model cache is where they say."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()


def model_cache_dir() -> Path:
    """The model cache the product uses (CHATBOT_MODEL_CACHE, var/models by default)."""
    setup_django()
    from django.conf import settings

    return Path(settings.CHATBOT_MODEL_CACHE)


def bundled_gguf() -> Path:
    from conversations.llm.loading import bundled_gguf_path

    return bundled_gguf_path()


def prepared_model_dir() -> Path:
    """The cached safetensors directory of the bundled model (converted once if missing)."""
    from conversations.llm.loading import prepare_bundled_model

    return prepare_bundled_model(model_cache_dir())


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# The contenders (each runs in a process of its own: see workers.py and contender.py)


@functools.cache
def engine():
    """The product's engine, built from settings exactly as the server builds it, loaded.

    Benchmarks use only its public interface (stream, generate, count_tokens, score_reply), so
    they measure whatever the engine becomes."""
    setup_django()
    from conversations.runtime import get_engine

    prepared_model_dir()  # convert outside any timing
    built = get_engine()
    built.load()
    return built


def product_params(**overrides):
    """The server's default generation parameters (greedy), with `overrides` on top."""
    setup_django()
    from conversations.runtime import default_generation_params

    return dataclasses.replace(default_generation_params(), temperature=0.0, **overrides)


@functools.cache
def reference_model():
    """The naive baseline: plain transformers in fp32 from the cached safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepared_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def chat(user: str, *history: tuple[str, str]) -> list[dict]:
    """A message list: the system prompt, earlier (question, answer) turns, then `user`."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question, answer in history:
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return [*messages, {"role": "user", "content": user}]
