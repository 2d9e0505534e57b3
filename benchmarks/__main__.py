"""python -m benchmarks [--only decode,ttft,quality,concurrency,fairness,memory,api,relay,soak]
[--quick]

Runs the benchmarks (all but the soak by default: it takes an hour or more), prints a table with
the ratios and the targets, and writes var/bench/results-<timestamp>.json. Figures only: nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from .common import BENCH_DIR
from .report import BUSY_CPU_PERCENT, Report

# In this order: the model (its contenders in worker processes), the server, the database.
BENCHMARKS = {
    "decode": "Decode speed: engine vs transformers generate vs llama.cpp",
    "ttft": "Time to first token vs history length",
    "quality": "Quality guard: greedy answers and perplexity vs the fp32 reference",
    "concurrency": "Concurrent conversations through the HTTP server",
    "fairness": "Another user's first token while one user floods the model",
    "memory": "Start-up time and peak memory of the server",
    "api": "API overhead without generation on 1k and 100k messages",
    "relay": "One web process relaying streams from an inference server",
    "soak": "The worker's memory over 1,000 messages of a mixed workload",
}
# Run only when named (`--only soak`, `make soak`): the rest of the suite takes minutes.
LONG = {"soak"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or [
        name for name in BENCHMARKS if name not in LONG
    ]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    report = Report(quick=args.quick)
    started = time.perf_counter()
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        busy = other_cpu_percent()
        if busy > BUSY_CPU_PERCENT:
            print(f"   (busy machine: {busy:.0f}% CPU in use by others; figures will be noisy)")
        began = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.{name}").run(report, args.quick)
        except Exception as exc:  # one failing benchmark does not stop the others
            traceback.print_exc()
            section = report.sections.get(name) or report.section(name, BENCHMARKS[name])
            section.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        report.sections[name].seconds = time.perf_counter() - began
        report.sections[name].busy_cpu_percent = busy
        print(f"   ({report.sections[name].seconds:.0f} s)", flush=True)

    print()
    print(report.table())
    path = report.write_json(BENCH_DIR)
    print(f"\nTotal {time.perf_counter() - started:.0f} s. Results: {path}")
    failed = [key for key, section in report.sections.items() if section.error]
    return 1 if failed else 0


def other_cpu_percent() -> float:
    """CPU in use (% of all cores) over one second while this suite is idle between benchmarks:
    what other programs take. Benchmarks on a busy machine give noisy figures."""
    import psutil

    return psutil.cpu_percent(interval=1.0)


if __name__ == "__main__":
    sys.exit(main())
