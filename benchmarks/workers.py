"""Contenders that run in processes of their own, driven over pipes: one JSON request per line
in, one JSON answer per line out.

Why processes: each contender gets a clean process, so nothing one of them does (threads, the
OpenMP thread pools torch starts, memory) slows another down. This matters: on this machine a
torch OpenMP pool left in one thread makes torch work started from another thread run about 40%
slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import ROOT


class WorkerProcess:
    """A subprocess speaking JSON lines. The first line it prints says it is ready."""

    def __init__(self, command: list[str], *, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.process.args[-1]} worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the worker {self.process.args} exited (code {code})")
        return json.loads(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The engine as it runs on a CPU with AVX2 and no AVX-512: torch limited to AVX2, our AVX2 kernels.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "CHATBOT_NATIVE_KERNELS": "avx2",
}
# ... and on one with AVX-VNNI too (Intel's Alder Lake and later): our AVX2 kernels with VNNI's
# dot products (on an AVX-512 VNNI machine, the same instruction in its AVX-512 VL encoding).
AVX2_VNNI_ENV = {**AVX2_ENV, "CHATBOT_NATIVE_KERNELS": "avx2-vnni"}


def engine_worker(*, env: dict | None = None) -> WorkerProcess:
    """The product's engine (built from settings as the server builds it), with `env` added to
    its environment."""
    command = [sys.executable, "-m", "benchmarks.contender", "engine"]
    return WorkerProcess(command, env={**os.environ, **env} if env else None)


def reference_worker() -> WorkerProcess:
    """The naive baseline: plain transformers, fp32, from the cached safetensors directory."""
    return WorkerProcess([sys.executable, "-m", "benchmarks.contender", "reference"])


def llama_worker(gguf: Path, *, threads: int = 2, build: str = "avx2") -> WorkerProcess:
    """llama.cpp on the GGUF, in the environment of `build` (built on first use; see
    llama_env.py)."""
    from .llama_env import llama_python

    script = Path(__file__).with_name("llama_worker.py")
    command = [str(llama_python(build)), str(script), "--model", str(gguf)]
    return WorkerProcess([*command, "--threads", str(threads)])
