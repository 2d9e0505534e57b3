"""Decode speed, single stream: 128 new tokens, greedy, the same prompt, five contenders.

- the engine, through its public interface (Engine.generate), with the product's parameters;
- the engine as on a CPU with AVX2 and no AVX-512 (torch limited to AVX2, our AVX2 kernels:
  workers.AVX2_ENV);
- the naive baseline: plain `model.generate` in fp32 from the cached safetensors directory,
  `generate(max_new_tokens=128, min_new_tokens=128, do_sample=False)`;
- llama.cpp (llama-cpp-python) on the same bundled GGUF, 2 threads, the GGUF's chat template,
  temperature 0, max_tokens=128, in two builds (llama_env.BUILDS): for this CPU (with the
  AVX-512 extensions it has), the engine's match; for AVX2 + FMA, the AVX2-only engine's. (On a
  CPU without AVX-512 they are one build, run once.)

Each contender runs in its own process (workers.py) and warms up first; then the rounds
interleave the contenders, so a slow moment of the machine hits all of them alike. Tokens/s =
tokens actually produced / wall time of the call (prompt processing included; the prompt is ~30
tokens). The median round counts.
"""

from __future__ import annotations

from contextlib import ExitStack

from . import common, llama_env, workers
from .report import Report, fmt, fmt_ratio

KEY = "decode"
NEW_TOKENS = 128
WARMUP_TOKENS = 32
ENGINE = "engine"
ENGINE_AVX2 = "engine, AVX2 only"
GENERATE = "transformers generate (fp32)"
LLAMA = "llama.cpp built for this CPU (same GGUF)"
LLAMA_AVX2 = "llama.cpp AVX2 build (same GGUF)"


def run(report: Report, quick: bool) -> None:
    section = report.section(KEY, f"Decode: single stream, {NEW_TOKENS} new tokens, greedy")
    rounds = 2 if quick else 5
    messages = common.chat(common.LONG_PROMPT)
    runs: dict[str, list[dict]] = {}
    with ExitStack() as stack:
        engine = stack.enter_context(workers.engine_worker())
        avx2 = stack.enter_context(workers.engine_worker(env=workers.AVX2_ENV))
        reference = stack.enter_context(workers.reference_worker())
        contenders = {
            ENGINE: lambda n: engine.request(op="generate", messages=messages, max_new_tokens=n),
            ENGINE_AVX2: lambda n: avx2.request(op="generate", messages=messages, max_new_tokens=n),
            GENERATE: lambda n: reference.request(
                op="generate", messages=messages, max_new_tokens=n, min_new_tokens=n
            ),
        }
        builds = {LLAMA: "native", LLAMA_AVX2: "avx2"}
        if llama_env.BUILDS["native"]() == llama_env.BUILDS["avx2"]():
            builds = {LLAMA: "avx2"}
        for name, build in builds.items():
            try:
                llama = stack.enter_context(
                    workers.llama_worker(common.bundled_gguf(), threads=2, build=build)
                )
            except Exception as exc:  # reported; the other contenders still run
                section.data[f"llama_cpp_{build}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"  llama.cpp ({build}) unavailable: {exc}")
                continue
            section.data[f"llama_cpp_{build}"] = llama.info
            contenders[name] = lambda n, llama=llama: llama.request(messages=messages, max_tokens=n)

        for contender in contenders.values():
            contender(WARMUP_TOKENS)
        runs = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, contender in contenders.items():
                result = contender(NEW_TOKENS)
                result["tokens_per_s"] = result["tokens"] / result["seconds"]
                runs[name].append(result)
                print(f"  {name}: {result['tokens']} tokens, {result['tokens_per_s']:.1f} tok/s")

    speeds = {name: common.median([r["tokens_per_s"] for r in rs]) for name, rs in runs.items()}
    section.data.update({"rounds": rounds, "runs": runs, "median_tokens_per_s": speeds})
    for name, rs in runs.items():
        tokens = sorted({r["tokens"] for r in rs})
        note = f"tokens per run: {', '.join(map(str, tokens))}"
        if name != ENGINE:
            note += f"; engine / this = {fmt_ratio(common.ratio(speeds[ENGINE], speeds[name]))}"
        decode_only = [r["decode_tokens_per_s"] for r in rs if r.get("decode_tokens_per_s")]
        if decode_only:
            note += f"; after the first token {fmt(common.median(decode_only))} tok/s"
        report.row(KEY, f"{name} tokens/s", fmt(speeds[name]), note)

    versus_llama = common.ratio(speeds[ENGINE], speeds.get(LLAMA))
    section.data["engine_vs_llama_cpp"] = versus_llama
    avx2_vs_llama = common.ratio(speeds[ENGINE_AVX2], speeds.get(LLAMA_AVX2, speeds.get(LLAMA)))
    section.data["engine_avx2_vs_llama_cpp_avx2"] = avx2_vs_llama
    section.data["engine_vs_generate"] = common.ratio(speeds[ENGINE], speeds[GENERATE])
    report.target(
        "Single-stream decode vs llama.cpp built for this CPU (same GGUF, same run)",
        ">= 1.3x",
        fmt_ratio(versus_llama),
        None if versus_llama is None else versus_llama >= 1.3,
    )
    report.target(
        "Single-stream decode, both AVX2 only: engine vs llama.cpp (same GGUF, same run)",
        ">= 1.0x",
        fmt_ratio(avx2_vs_llama),
        None if avx2_vs_llama is None else avx2_vs_llama >= 1.0,
    )
