"""llama.cpp for the decode comparison and for the tests of the remote engine against a real
inference server: `llama-cpp-python` (with its OpenAI-compatible server) in a virtualenv of its
own.

It is never a product dependency. The package compiles from source (several minutes on two
cores), so each environment is built once and kept under var/bench/, named by a hash of what went
into it (Python version, package version, build flags); later runs reuse it.

Two builds (BUILDS), each the match of one configuration of the engine: `avx2` (AVX2 + FMA +
F16C, what CPUs without AVX-512 have; the tests use it) and `native`, for this machine's CPU:
AVX2 plus the AVX-512 extensions /proc/cpuinfo lists. Not GGML_NATIVE=ON: on CPUs with AMX that
build crashed at the first inference. Without AVX-512 the two are one build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conversations.llm import native

from .common import BENCH_DIR

LLAMA_CPP_PACKAGE = "llama-cpp-python[server]==0.3.36"
AVX2_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"
)
# ggml's AVX-512 switches, by the /proc/cpuinfo flags each needs.
AVX512_SWITCHES = {
    "-DGGML_AVX512=ON": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
    "-DGGML_AVX512_VBMI=ON": ("avx512vbmi",),
    "-DGGML_AVX512_VNNI=ON": ("avx512_vnni",),
    "-DGGML_AVX512_BF16=ON": ("avx512_bf16",),
}
BUILD_TIMEOUT_SECONDS = 45 * 60


def native_args() -> str:
    """AVX2_ARGS and the AVX-512 switches this CPU has (each only with the base set)."""
    flags = native.cpu_flags()
    switches = [s for s, needs in AVX512_SWITCHES.items() if flags.issuperset(needs)]
    if "-DGGML_AVX512=ON" not in switches:
        switches = []
    return " ".join([AVX2_ARGS, *switches])


BUILDS = {"avx2": lambda: AVX2_ARGS, "native": native_args}


def venv_dir(cmake_args: str = AVX2_ARGS) -> Path:
    key = f"{sys.version}|{LLAMA_CPP_PACKAGE}|{cmake_args}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return BENCH_DIR / f"llama-venv-{digest}"


def llama_python(build: str = "avx2", log=print) -> Path:
    """The Python of the llama.cpp environment of `build` (BUILDS), built first if it is not
    there yet."""
    from filelock import FileLock

    cmake_args = BUILDS[build]()
    target = venv_dir(cmake_args)
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
        log(
            f"Building {LLAMA_CPP_PACKAGE} ({build}: {cmake_args}) into {target} "
            f"(once; ~10 minutes). Log: {build_log}"
        )
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
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
        ready.write_text(f"{LLAMA_CPP_PACKAGE}\n{cmake_args}\n")
        log(f"Built llama.cpp in {time.monotonic() - started:.0f} s.")
    return python


if __name__ == "__main__":
    print(llama_python(*sys.argv[1:2]))
