"""The load script: a small run through the real server and model (what CI runs), and its
bookkeeping, which must notice a lost or duplicated message."""

import subprocess
import sys
from pathlib import Path

from benchmarks.load import tally

ROOT = Path(__file__).resolve().parent.parent


def test_tally_counts_lost_and_duplicated_messages():
    sent = {"a": ["one", "two"], "b": ["three"]}
    stored = {
        "a": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "one?"}],
        "b": [{"role": "user", "content": "three"}, {"role": "user", "content": "three"}],
    }
    assert tally(sent, stored) == {"sent": 3, "stored": 3, "lost": 1, "duplicated": 1}
    stored["a"].append({"role": "user", "content": "two"})
    stored["b"].pop()
    assert tally(sent, stored) == {"sent": 3, "stored": 3, "lost": 0, "duplicated": 0}


def test_a_small_load_run_loses_and_duplicates_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--clients", "4", "--messages", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shown = {}
    for line in result.stdout.splitlines():
        if "  " in line:
            label, value = line.split("  ", 1)
            shown[label.strip()] = value.strip()
    assert shown["5xx responses"] == "0"
    assert shown["requests not answered 201"] == "0"
    assert shown["user messages stored / sent"] == "8 / 8"
    assert shown["lost"] == "0" and shown["duplicated"] == "0"
    assert shown["replies stored / not ok"] == "8 / 0"
