"""Concurrency through the real HTTP server: 1, 4 and 8 conversations at once.

gunicorn serves the real model (tests/live_server.py's Server) on a loopback port. Each
conversation is its own thread and asks for 64 tokens (CHATBOT_MAX_NEW_TOKENS and the
conversation's max_new_tokens), one message after another, four times (with two, the level of
one conversation lasted under a second, and one slow moment of the machine moved the ratio by
5%); all conversations of a level start together. Aggregate tokens/s = all completion tokens /
wall time of the level; latency = one request from sending it to the end of the streamed reply.

The target compares the widest level with one conversation, and this machine's speed drifts over
minutes (a slow spell moved that ratio by 10%): after the levels in order, one conversation and
eight are measured PAIRS - 1 more times, each right after the other. The ratio is taken per pair
(one run of 1 and the run of 8 that follows it) and the median of the pairs is reported.

Three configurations, one server each: the engine as it runs here (the best kernels the CPU
has), as on a CPU with AVX2 and no AVX-512 (workers.AVX2_ENV), and as on one with AVX-VNNI as
well (workers.AVX2_VNNI_ENV; left out where this CPU has neither AVX-VNNI nor AVX-512 VNNI).
"""

from __future__ import annotations

import statistics
import threading
import time

from conversations.llm import native

from . import common, workers
from .report import Report, fmt, fmt_ratio
from .server import BenchServer

KEY = "concurrency"
LEVELS = (1, 4, 8)
PAIRS = 3
NEW_TOKENS = 64
PROMPT = "Write a long story about a lighthouse keeper named {name}."
NAMES = ["Ada", "Ben", "Clara", "David", "Elena", "Finn", "Greta", "Hugo"]
# Per configuration: the server's environment, and the least the widest level should reach as a
# multiple of one conversation.
CONFIGS = {
    "native": ({}, 3.3),
    "AVX2 only": (workers.AVX2_ENV, 3.0),
    "AVX2 + VNNI": (workers.AVX2_VNNI_ENV, 3.0),
}


def run(report: Report, quick: bool) -> None:
    section = report.section(
        KEY, f"Concurrency over HTTP: conversations at once, {NEW_TOKENS} tokens each"
    )
    for config, (env, goal) in CONFIGS.items():
        kernels = env.get("CHATBOT_NATIVE_KERNELS")
        if kernels and native.choose(kernels) is None:
            print(f"  {config}: left out (this CPU cannot run those kernels)")
            continue
        print(f"  {config}:")
        section.data[config] = _config(report, quick, config, env, goal)


def _config(report: Report, quick: bool, config: str, config_env: dict, goal: float) -> dict:
    """The levels through one server with `config_env`: rows and a target in the report."""
    label = "" if config == "native" else f"{config}: "
    messages_each = 1 if quick else 4
    single, widest = LEVELS[0], LEVELS[-1]
    order = list(LEVELS) + [single, widest] * ((1 if quick else PAIRS) - 1)
    env = {"CHATBOT_MAX_NEW_TOKENS": str(NEW_TOKENS), **config_env}
    runs: dict[int, list[dict]] = {level: [] for level in LEVELS}
    with BenchServer(env=env) as server:
        server.prepare()
        server.start()
        warm = server.new_conversation(max_new_tokens=NEW_TOKENS)
        server.ask(warm, "Hello!")  # waits for the model to load
        for level in order:
            result = _level(server, level, messages_each)
            runs[level].append(result)
            print(
                f"    {level} at once: {result['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                f"p95 latency {result['latency_p95_s']:.1f} s"
            )
        memory = server.worker_memory_mb()

    levels = {level: _summary(level_runs) for level, level_runs in runs.items()}
    pair_ratios = [
        common.ratio(wide["aggregate_tokens_per_s"], one["aggregate_tokens_per_s"])
        for one, wide in zip(runs[single], runs[widest], strict=True)
    ]
    scaling = statistics.median(pair_ratios)
    one = levels[single]["aggregate_tokens_per_s"]
    for level, result in levels.items():
        report.row(
            KEY,
            f"{label}{level} conversation{'s' if level > 1 else ''} at once",
            f"{fmt(result['aggregate_tokens_per_s'])} tok/s aggregate",
            f"latency p50 {fmt(result['latency_p50_s'], 2)} s, p95 "
            f"{fmt(result['latency_p95_s'], 2)} s; TTFT p95 {fmt(result['ttft_p95_s'], 2)} s; "
            f"{fmt_ratio(common.ratio(result['aggregate_tokens_per_s'], one))} of single; "
            f"{result['requests']} request{'s' if result['requests'] != 1 else ''}"
            + (f"; median of {len(runs[level])} runs" if len(runs[level]) > 1 else ""),
        )
    report.row(
        KEY,
        f"{label}{widest} at once vs 1, per pair of runs",
        ", ".join(fmt_ratio(r) for r in pair_ratios),
        f"median {fmt_ratio(scaling)}",
    )
    if memory:
        report.row(
            KEY, f"{label}Worker peak RSS after the run (VmHWM)", f"{fmt(memory['VmHWM'], 0)} MiB"
        )
    report.target(
        f"{label}Aggregate tokens/s at {widest} conversations vs single stream",
        f">= {goal}x",
        f"{fmt_ratio(scaling)} (median of {len(pair_ratios)} pair"
        f"{'s' if len(pair_ratios) > 1 else ''})",
        scaling >= goal,
    )
    return {
        "levels": levels,
        "runs": runs,
        "pair_ratios": pair_ratios,
        "worker_memory_mb": memory,
        "scaling": scaling,
    }


def _summary(runs: list[dict]) -> dict:
    """A level's runs in one: the median aggregate, latencies over all their requests."""
    results = [r for run in runs for r in run["results"]]
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    return {
        "requests": len(results),
        "aggregate_tokens_per_s": statistics.median(r["aggregate_tokens_per_s"] for r in runs),
        "latency_p50_s": common.percentile(latencies, 50),
        "latency_p95_s": common.percentile(latencies, 95),
        "ttft_p50_s": common.percentile(ttfts, 50),
        "ttft_p95_s": common.percentile(ttfts, 95),
    }


def _level(server: BenchServer, level: int, messages_each: int) -> dict:
    conversations = [server.new_conversation(max_new_tokens=NEW_TOKENS) for _ in range(level)]
    barrier = threading.Barrier(level + 1)
    results: list[dict] = []
    errors: list[str] = []

    def client(index: int) -> None:
        barrier.wait()
        for turn in range(messages_each):
            name = NAMES[(index + turn) % len(NAMES)]
            try:
                results.append(server.ask(conversations[index], PROMPT.format(name=name)))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(level)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "latency_p50_s": common.percentile(latencies, 50),
        "latency_p95_s": common.percentile(latencies, 95),
        "ttft_p50_s": common.percentile(ttfts, 50),
        "ttft_p95_s": common.percentile(ttfts, 95),
        "results": results,
    }
