"""Commands of the product run as an operator runs them: a fresh Python process in the
repository, with this environment and some settings of its own."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str, env: dict[str, str], timeout: float = 600):
    """`python *args` in the repository, with `env` added to this process's environment; its
    output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
