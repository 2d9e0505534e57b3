"""Memory and start-up of the serving process (gunicorn with the real model).

Start-up = from starting gunicorn to the first reply of a message sent as soon as the server
answers: once with the prepared model cache, once with an empty CHATBOT_MODEL_CACHE (the worker
converts the bundled GGUF first). Memory = the worker's peak resident set (VmHWM in
/proc/<pid>/status) after that first reply.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from . import common
from .report import Report, fmt
from .server import BenchServer

KEY = "memory"
REPLY_TOKENS = 16


def run(report: Report, quick: bool) -> None:
    report.section(KEY, "Start-up and memory of the serving process")
    common.prepared_model_dir()  # the "prepared" case needs the cache in place
    empty_cache = Path(tempfile.mkdtemp(prefix="empty-model-cache-", dir=common.BENCH_DIR))
    cases = {
        "prepared model cache": {},
        "empty model cache (converts the GGUF)": {"CHATBOT_MODEL_CACHE": str(empty_cache)},
    }
    results = {}
    try:
        for name, env in cases.items():
            results[name] = _start_and_ask(env)
            print(
                f"  {name}: first reply after {results[name]['first_reply_s']:.1f} s, "
                f"peak RSS {results[name]['memory_mb'].get('VmHWM', 0):.0f} MiB"
            )
    finally:
        shutil.rmtree(empty_cache, ignore_errors=True)

    for name, result in results.items():
        report.row(
            KEY,
            f"Start to first reply, {name}",
            f"{fmt(result['first_reply_s'])} s",
            f"first text at {fmt(result['first_text_s'])} s; pages served after "
            f"{fmt(result['serving_s'])} s",
        )
    for name, result in results.items():
        memory = result["memory_mb"]
        report.row(
            KEY,
            f"Worker peak RSS (VmHWM), {name}",
            f"{fmt(memory.get('VmHWM'), 0)} MiB",
            f"RSS now {fmt(memory.get('VmRSS'), 0)} MiB",
        )
    report.sections[KEY].data["cases"] = results


def _start_and_ask(env: dict) -> dict:
    with BenchServer(env={"CHATBOT_MAX_NEW_TOKENS": str(REPLY_TOKENS), **env}) as server:
        server.prepare()
        started = time.perf_counter()
        server.start()  # returns once the login page answers
        serving = time.perf_counter() - started
        conversation = server.new_conversation(max_new_tokens=REPLY_TOKENS)
        reply = server.ask(conversation, "What is the capital of France?")
        first_reply = time.perf_counter() - started
        return {
            "serving_s": serving,
            "first_text_s": first_reply - reply["latency_s"] + reply["ttft_s"],
            "first_reply_s": first_reply,
            "memory_mb": server.worker_memory_mb(),
            "reply": reply,
        }
