"""llama.cpp for the decode comparison and for the tests of the remote engine against a real
inference server: `llama-cpp-python` (with its OpenAI-compatible server) in a virtualenv of its
own.

It is never a product dependency. The package compiles from source (several minutes on two
cores), so the environment is built once and kept under var/bench/, named by a hash of what went
into it (Python version, package version, build flags); later runs reuse it.

The build flags matter: a native build (GGML_NATIVE=ON, the default) picks up AVX-512/AMX on
this kind of CPU and crashes at the first inference, so llama.cpp is built for AVX2 + FMA.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import BENCH_DIR

LLAMA_CPP_PACKAGE = "llama-cpp-python[server]==0.3.36"
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"
)
BUILD_TIMEOUT_SECONDS = 45 * 60


def venv_dir() -> Path:
    key = f"{sys.version}|{LLAMA_CPP_PACKAGE}|{CMAKE_ARGS}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return BENCH_DIR / f"llama-venv-{digest}"


def llama_python(log=print) -> Path:
    """The Python of the llama.cpp environment, built first if it is not there yet."""
    from filelock import FileLock

    target = venv_dir()
    python = target / "bin" / "python"
    ready = target / ".ready"
    if ready.exists():
        return python
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if ready.exists():
            return python
        shutil.rmtree(target, ignore_errors=True)  # a build that was interrupted
        build_log = target.with_suffix(".build.log")
        log(f"Building {LLAMA_CPP_PACKAGE} into {target} (once; ~10 minutes). Log: {build_log}")
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        with build_log.open("w") as out:
            # --no-cache-dir: never reuse a wheel that pip built earlier with other flags.
            subprocess.run(
                [str(python), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PACKAGE],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=BUILD_TIMEOUT_SECONDS,
            )
        ready.write_text(f"{LLAMA_CPP_PACKAGE}\n{CMAKE_ARGS}\n")
        log(f"Built llama.cpp in {time.monotonic() - started:.0f} s.")
    return python


if __name__ == "__main__":
    print(llama_python())
