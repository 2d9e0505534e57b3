"""The Insights page's charts (insights.Chart) drawn as SVG on the server: bars, stacked bars or
lines, with axes, a legend, a <title> and a text alternative (role="img" and aria-label).

No script and no inline style (the Content-Security-Policy forbids both): colours come from
classes in static/conversations/insights.css, and text and axes are currentColor, so the charts
follow the admin's light and dark themes.
"""

from __future__ import annotations

import math

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from .insights import Chart, Series

WIDTH, HEIGHT = 720, 260
# Room on the right for half the last day's label, centred under its bar.
LEFT, RIGHT, TOP, BOTTOM = 64, 40, 34, 40
PLOT_WIDTH, PLOT_HEIGHT = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
# Roughly the width of a character of the axes' 11px text, to space labels that do not overlap.
CHAR_WIDTH = 6.6
KINDS = {"bars": "Bar chart", "stacked": "Stacked bar chart", "lines": "Line chart"}


def render(chart: Chart) -> SafeString:
    """`chart` as an <svg> element, ready to put in a page."""
    top = _highest(chart)
    ticks = nice_ticks(top, whole=chart.decimals == 0)
    scale = _Scale(len(chart.categories), ticks[-1])
    marks = _lines(chart, scale) if chart.kind == "lines" else _bars(chart, scale)
    return format_html(
        '<svg class="insights-chart" viewBox="0 0 {} {}" role="img" aria-label="{}" '
        'xmlns="http://www.w3.org/2000/svg" fill="currentColor" font-size="11">'
        "<title>{}</title>{}{}{}{}{}</svg>",
        WIDTH,
        HEIGHT,
        describe(chart),
        chart.title,
        _y_axis(chart, ticks, scale),
        _x_axis(chart, scale),
        marks,
        _legend(chart.series),
        _empty_note(chart),
    )


def describe(chart: Chart) -> str:
    """The chart in words, for those who cannot see it: what it plots, and each series'
    lowest and highest figure."""
    kind = KINDS[chart.kind]
    if not chart.categories:
        return f"{kind}: {chart.title}. No data in this range."
    span = chart.categories[0]
    if len(chart.categories) > 1:
        span += f" to {chart.categories[-1]}"
    words = [f"{kind}: {chart.title}, in {chart.unit}, by {chart.category.lower()}, {span}."]
    for series in chart.series:
        figures = [
            (v, c) for v, c in zip(series.values, chart.categories, strict=True) if v is not None
        ]
        if not figures:
            words.append(f"{series.name}: none.")
            continue
        # The first day of the lowest and of the highest figure.
        low = min(figures, key=lambda figure: figure[0])
        high = max(figures, key=lambda figure: figure[0])
        words.append(
            f"{series.name}: lowest {_number(low[0], chart.decimals)} ({low[1]}), "
            f"highest {_number(high[0], chart.decimals)} ({high[1]})."
        )
    return " ".join(words)


def nice_ticks(top: float, *, whole: bool = False, count: int = 4) -> list[float]:
    """Ticks from 0 to at least `top`, about `count` steps of 1, 2, 2.5 or 5 times a power of
    ten; with `whole`, steps of whole numbers only (no half a user)."""
    if top <= 0:
        return [0, 1]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    if whole:
        magnitude = max(magnitude, 1)
    multiples = (1, 2, 5, 10) if whole and magnitude == 1 else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in multiples if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


class _Scale:
    """Where categories and values fall in the plot area."""

    def __init__(self, categories: int, highest: float):
        self.band = PLOT_WIDTH / max(categories, 1)
        self.highest = highest

    def center(self, index: int) -> float:
        return LEFT + self.band * (index + 0.5)

    def y(self, value: float) -> float:
        return TOP + PLOT_HEIGHT * (1 - value / self.highest)


def _highest(chart: Chart) -> float:
    if chart.kind == "stacked":
        totals = [sum(v or 0 for v in values) for values in zip(*_values(chart), strict=True)]
        return max(totals, default=0)
    return max((v for values in _values(chart) for v in values if v is not None), default=0)


def _values(chart: Chart) -> list[list[float | None]]:
    return [series.values for series in chart.series]


def _y_axis(chart: Chart, ticks: list[float], scale: _Scale) -> SafeString:
    lines = format_html_join(
        "",
        '<line class="grid" x1="{x1}" x2="{x2}" y1="{y}" y2="{y}"/>'
        '<text class="tick" x="{label}" y="{y}" text-anchor="end" dominant-baseline="middle">'
        "{tick}</text>",
        (
            {
                "x1": LEFT,
                "x2": LEFT + PLOT_WIDTH,
                "y": _at(scale.y(tick)),
                "label": LEFT - 6,
                "tick": _short(tick),
            }
            for tick in ticks
        ),
    )
    middle = TOP + PLOT_HEIGHT / 2
    return format_html(
        '{}<text class="axis-title" x="14" y="{}" text-anchor="middle" '
        'transform="rotate(-90 14 {})">{}</text>',
        lines,
        _at(middle),
        _at(middle),
        chart.unit,
    )


def _x_axis(chart: Chart, scale: _Scale) -> SafeString:
    """The axis line and as many category labels as fit side by side without overlapping."""
    categories = chart.categories
    widest = max((len(c) for c in categories), default=1) * CHAR_WIDTH + 12
    step = max(1, math.ceil(widest / scale.band))
    room = int(scale.band * step / CHAR_WIDTH) - 1  # characters a label may take
    labels = format_html_join(
        "",
        '<text class="tick" x="{}" y="{}" text-anchor="middle">{}</text>',
        (
            (_at(scale.center(i)), TOP + PLOT_HEIGHT + 16, _clip(category, room))
            for i, category in enumerate(categories)
            if i % step == 0
        ),
    )
    bottom = TOP + PLOT_HEIGHT
    return format_html(
        '<line class="axis" x1="{}" x2="{}" y1="{}" y2="{}"/>{}'
        '<text class="axis-title" x="{}" y="{}" text-anchor="middle">{}</text>',
        LEFT,
        LEFT + PLOT_WIDTH,
        bottom,
        bottom,
        labels,
        _at(LEFT + PLOT_WIDTH / 2),
        HEIGHT - 4,
        chart.category,
    )


def _bars(chart: Chart, scale: _Scale) -> SafeString:
    """Side by side in each category's band, or stacked (kind "stacked")."""
    stacked = chart.kind == "stacked"
    group = scale.band * 0.8
    width = group if stacked else group / max(len(chart.series), 1)
    bars = []
    for i, category in enumerate(chart.categories):
        base = 0.0
        for j, series in enumerate(chart.series):
            value = series.values[i]
            if not value:
                continue
            low = base if stacked else 0.0
            x = scale.center(i) - group / 2 + (0 if stacked else j * width)
            y = scale.y(low + value)
            bars.append(
                (
                    _tone(series, j),
                    _at(x),
                    _at(y),
                    _at(width),
                    _at(scale.y(low) - y),
                    _tooltip(category, series, value, chart),
                )
            )
            if stacked:
                base += value
    return format_html_join(
        "",
        '<rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{}</title></rect>',
        bars,
    )


def _lines(chart: Chart, scale: _Scale) -> SafeString:
    """A polyline a series, broken where a category has no figure; a dot on every figure (a
    figure between two gaps has no line to show it)."""
    parts = []
    for j, series in enumerate(chart.series):
        runs: list[list[str]] = [[]]
        for i, value in enumerate(series.values):
            if value is None:
                runs.append([])
                continue
            x, y = _at(scale.center(i)), _at(scale.y(value))
            runs[-1].append(f"{x},{y}")
            parts.append(
                format_html(
                    '<circle class="point {}" cx="{}" cy="{}" r="2.5"><title>{}</title></circle>',
                    _tone(series, j),
                    x,
                    y,
                    _tooltip(chart.categories[i], series, value, chart),
                )
            )
        parts.extend(
            format_html(
                '<polyline class="line {}" fill="none" points="{}"/>',
                _tone(series, j),
                " ".join(run),
            )
            for run in runs
            if len(run) > 1
        )
    return mark_safe("".join(parts))  # each part built by format_html


def _legend(series: list[Series]) -> SafeString:
    items, x = [], LEFT
    for j, one in enumerate(series):
        items.append((_tone(one, j), x, x + 14, one.name))
        x += 14 + len(one.name) * CHAR_WIDTH + 18
    return format_html_join(
        "",
        '<rect class="{}" x="{}" y="10" width="10" height="10"/>'
        '<text class="legend" x="{}" y="19">{}</text>',
        items,
    )


def _empty_note(chart: Chart) -> SafeString:
    if any(v for values in _values(chart) for v in values):
        return mark_safe("")
    return format_html(
        '<text class="empty" x="{}" y="{}" text-anchor="middle">No data in this range.</text>',
        _at(LEFT + PLOT_WIDTH / 2),
        _at(TOP + PLOT_HEIGHT / 2),
    )


def _tone(series: Series, index: int) -> str:
    """The series' class, which gives it its colour (insights.css)."""
    return f"tone-{series.tone}" if series.tone else f"series-{index + 1}"


def _tooltip(category: str, series: Series, value: float, chart: Chart) -> str:
    return f"{category}, {series.name}: {_number(value, chart.decimals)} {chart.unit}"


def _number(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _short(value: float) -> str:
    """A tick's figure: 1.5k, 2M, 0.25."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _clip(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(room - 1, 1)] + "…"


def _at(coordinate: float) -> str:
    """A coordinate to a tenth of a unit: enough on a 720-wide view, and a shorter page."""
    return f"{coordinate:.1f}".removesuffix(".0")
