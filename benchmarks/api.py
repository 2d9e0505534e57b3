"""API overhead without generation, on seeded databases of 1k and 100k messages.

Each scale runs in its own process (api_worker.py) with a temporary SQLite database: 10 and 1,000
conversations of 100 messages each, seeded with bulk_create (the full-text search triggers fire
for every row; the seeding time is reported). Timed in-process through Django's test client
(token auth, no network): p50/p95 of listing conversations and of a thread's messages, and the SQL
queries each request takes. The same for the admin's Insights page (a staff user's session) over
90 days holding every seeded message: its aggregates read every message of the range, so its
time grows with them and is reported, not judged; its query count must not grow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common
from .report import Report, fmt, fmt_ratio

KEY = "api"
MESSAGES_PER_CONVERSATION = 100
SCALES = {"1k": 10, "100k": 1000}
LABELS = {
    "conversations": "GET /api/conversations/",
    "conversations_page10": "GET /api/conversations/?page_size=10",
    "messages": "GET /api/conversations/<id>/messages/",
}
# The latency target compares like with like: the same number of rows on the page at both scales.
# The default page holds 50 conversations at 100k messages but only 10 at 1k (there are only 10),
# so it is shown, but judged with ?page_size=10; the thread's page holds 50 messages at both.
LIKE_FOR_LIKE = {"conversations_page10": "conversations", "messages": "messages"}


def run(report: Report, quick: bool) -> None:
    section = report.section(KEY, "API overhead without generation (in-process, SQLite)")
    requests = 30 if quick else 200
    scales = {name: _run_scale(count, requests) for name, count in SCALES.items()}
    small, large = scales["1k"]["endpoints"], scales["100k"]["endpoints"]
    section.data["scales"] = scales

    for result in scales.values():
        seed = result["seed"]
        report.row(
            KEY,
            f"Seeding {seed['messages']:,} messages ({seed['conversations']:,} conversations)",
            f"{fmt(seed['seconds'])} s",
            f"{seed['messages_per_s']:,.0f} messages/s with the search triggers",
        )
    growth = {}
    for endpoint, label in LABELS.items():
        a, b = small[endpoint], large[endpoint]
        growth[endpoint] = common.ratio(b["p50_ms"], a["p50_ms"])
        report.row(
            KEY,
            label,
            f"p50 {fmt(a['p50_ms'], 1)} / {fmt(b['p50_ms'], 1)} ms",
            f"1k / 100k messages; p95 {fmt(a['p95_ms'], 1)} / {fmt(b['p95_ms'], 1)} ms; "
            f"100k/1k {fmt_ratio(growth[endpoint])}; queries {a['queries']} / {b['queries']}; "
            f"{a['items']} / {b['items']} rows on the page",
        )
    section.data["p50_growth"] = growth

    a, b = scales["1k"]["insights"], scales["100k"]["insights"]
    growth["insights"] = common.ratio(b["p50_ms"], a["p50_ms"])
    report.row(
        KEY,
        f"GET /admin/insights/ ({a['days']} days)",
        f"p50 {fmt(a['p50_ms'], 1)} / {fmt(b['p50_ms'], 1)} ms",
        f"1k / 100k messages, all in the range; p95 {fmt(a['p95_ms'], 1)} / "
        f"{fmt(b['p95_ms'], 1)} ms; 100k/1k {fmt_ratio(growth['insights'])}; "
        f"queries {a['queries']} / {b['queries']}",
    )
    report.target(
        "Insights page: constant query count (1k vs 100k messages)",
        "same count",
        f"{a['queries']}/{b['queries']}",
        a["queries"] == b["queries"],
    )

    report.target(
        "Listing endpoints: constant query counts (1k vs 100k messages)",
        "same count",
        ", ".join(f"{e} {small[e]['queries']}/{large[e]['queries']}" for e in LABELS),
        all(small[e]["queries"] == large[e]["queries"] for e in LABELS),
    )
    judged = {name: growth[endpoint] for endpoint, name in LIKE_FOR_LIKE.items()}
    report.target(
        "Listing endpoints: p50 at 100k within 1.5x of p50 at 1k (same rows per page)",
        "<= 1.5x",
        ", ".join(f"{name} {fmt_ratio(value)}" for name, value in judged.items()),
        all(value is not None and value <= 1.5 for value in judged.values()),
    )


def _run_scale(conversations: int, requests: int) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="api-", dir=common.BENCH_DIR))
    env = {
        **os.environ,
        "CHATBOT_VAR_DIR": str(directory),
        "DATABASE_URL": f"sqlite:///{directory / 'db.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DJANGO_DEBUG": "false",
    }
    try:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.api_worker",
                f"--conversations={conversations}",
                f"--messages={MESSAGES_PER_CONVERSATION}",
                f"--requests={requests}",
            ],
            cwd=common.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"api_worker failed:\n{completed.stderr[-3000:]}")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    seed = result["seed"]
    timed = {**result["endpoints"], "insights": result["insights"]}
    print(
        f"  {seed['messages']:,} messages seeded in {seed['seconds']:.1f} s; "
        + ", ".join(
            f"{name} p50 {e['p50_ms']:.1f} ms ({e['queries']} queries)" for name, e in timed.items()
        )
    )
    return result
