"""Runs inside the llama.cpp environment (see llama_env.py), never in the product's.

Loads a GGUF with llama-cpp-python, then answers one JSON request per stdin line with one JSON
line on stdout: {"messages": [...], "max_tokens": 128} -> {"tokens" (completion tokens),
"prompt_tokens", "seconds", "finish_reason", "text"}. Generation is greedy (temperature 0) with
the model's own chat template (create_chat_completion). It imports nothing from the project.
"""

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()

    from llama_cpp import Llama, __version__

    started = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=args.context,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    ready = {"ready": True, "version": __version__, "load_seconds": time.perf_counter() - started}
    print(json.dumps(ready), flush=True)

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        llm.reset()  # no prompt cache carried over between requests
        started = time.perf_counter()
        out = llm.create_chat_completion(
            messages=request["messages"],
            temperature=0.0,
            max_tokens=request["max_tokens"],
            repeat_penalty=request.get("repeat_penalty", 1.0),
        )
        seconds = time.perf_counter() - started
        choice = out["choices"][0]
        reply = {
            "tokens": out["usage"]["completion_tokens"],
            "prompt_tokens": out["usage"]["prompt_tokens"],
            "seconds": seconds,
            "finish_reason": choice["finish_reason"],
            "text": choice["message"]["content"],
        }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
