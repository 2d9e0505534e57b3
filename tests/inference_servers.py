"""OpenAI-compatible inference servers run for real, as an operator runs one beside the product:
a subprocess on a free 127.0.0.1 port, ready once `GET /v1/models` answers, stopped at the end
(terminated, then killed). Its output goes to a temporary log file, shown when it fails to come
up (the test fails; it is not skipped) and by the tests when they fail."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port

# A model server loads its weights before it listens; a machine whose cores are busy is slow.
START_SECONDS = 180
LLAMA_CPP_ALIAS = "smollm2-q4_1"  # the name llama.cpp's server lists its model by


def transformers_serve(model_folder: Path) -> Callable[[int], list[str]]:
    """`transformers serve` of one local model folder (it answers one request at a time, and
    ends its chat streams without `data: [DONE]`)."""
    executable = Path(sys.executable).parent / "transformers"

    def command(port: int) -> list[str]:
        return [
            str(executable),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            str(model_folder),
        ]

    return command


def llama_cpp_server(gguf: Path) -> Callable[[int], list[str]]:
    """llama.cpp's server (llama-cpp-python's) on a GGUF file, from the environment the
    benchmarks build (benchmarks/llama_env.py: compiled once, ~10 minutes). It answers one
    request at a time; `--interrupt_requests False` lets a new request wait for the stream in
    flight instead of cutting it off. Its streams end with `data: [DONE]` and carry no usage."""
    from benchmarks.llama_env import llama_python

    python = llama_python()

    def command(port: int) -> list[str]:
        return [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            LLAMA_CPP_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "8192",
            "--interrupt_requests",
            "False",
        ]

    return command


# What llama.cpp's server logs when a client leaves a stream: it stops writing that reply.
LLAMA_CPP_LEFT = "Disconnected from client"


@dataclass
class InferenceServer:
    url: str  # the OpenAI-compatible base URL, http://127.0.0.1:PORT/v1
    process: subprocess.Popen[bytes]
    log: Path
    # What the server logs when a client closes a stream in flight (None: it logs nothing).
    says_when_left: str | None = None

    def log_text(self, start: int = 0) -> str:
        """The server's output, from byte `start` on."""
        with self.log.open("rb") as file:
            file.seek(start)
            return file.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size

    def kill(self) -> None:
        """SIGKILL the server and anything it started: no shutdown code runs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def running_server(
    command: Callable[[int], list[str]],
    *,
    env: dict[str, str] | None = None,
    says_when_left: str | None = None,
) -> Iterator[InferenceServer]:
    """Start `command(port)` on a free port, wait until it lists its models, yield it, stop it
    (its log is deleted then: a failing test has shown it)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"inference-server-{port}-", suffix=".log")[1])
    with log.open("ab") as out:
        process = subprocess.Popen(
            command(port),
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() and kill() reach all of it
        )
    server = InferenceServer(f"http://127.0.0.1:{port}/v1", process, log, says_when_left)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        server.stop()
        log.unlink(missing_ok=True)


def _wait_until_ready(server: InferenceServer) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"The inference server exited ({server.process.returncode}) before it answered; "
                f"its log ({server.log}):\n{server.log_text()}",
                pytrace=False,
            )
        try:
            if httpx.get(f"{server.url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet, or too busy loading to answer
            pass
        time.sleep(0.3)
    pytest.fail(
        f"The inference server did not answer GET /v1/models within {START_SECONDS} s; "
        f"its log ({server.log}):\n{server.log_text()}",
        pytrace=False,
    )
