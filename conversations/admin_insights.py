"""The operator's Insights page in the admin, /admin/insights/: a range of days' messages,
active users, tokens, latency, how replies ended and their ratings, as SVG charts drawn on the
server (charts.py) with their figures in tables; the figures come from insights.py.

Staff only: the view is wrapped in the admin site's admin_view, which sends anyone else to the
admin's login (and adds its CSRF and no-cache handling).

The range is a GET form's: ?days=7, 30 or 90 (the last days, today included; 30 by default), or
?from=YYYY-MM-DD&to=YYYY-MM-DD (both days included; `to` defaults to today; dates, when given,
win over `days`), in the server's TIME_ZONE. A range the page cannot draw (a date it cannot
read, `from` after `to`, more than insights.MAX_DAYS days) answers 400 with the reason on the
page, above the form to correct it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from django.conf import settings
from django.contrib import admin
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import SafeString

from . import charts, insights
from .insights import DEFAULT_DAYS, PRESETS, DateRange, RangeError

TEMPLATE = "admin/insights.html"


def chosen_range(query, today: date) -> tuple[DateRange, int | None]:
    """The range the query asks for, and which preset it is (None: dates). Raises RangeError."""
    start, end = query.get("from", "").strip(), query.get("to", "").strip()
    if start or end:
        if not start:
            raise RangeError("Give the range's first day (From) as well as its last.")
        return DateRange.between(_date(start, "From"), _date(end, "To") if end else today), None
    days = query.get("days", "").strip() or str(DEFAULT_DAYS)
    if days not in {str(preset) for preset in PRESETS}:
        *most, last = PRESETS
        choices = f"{', '.join(str(preset) for preset in most)} or {last}"
        raise RangeError(f"Choose the last {choices} days, or dates; not “{days}”.")
    return DateRange.last(int(days), today), int(days)


def _date(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise RangeError(f"{name}: “{text}” is not a date; give it as YYYY-MM-DD.") from None


@dataclass(frozen=True)
class ShownChart:
    """A chart as the template shows it: its words, its drawing and its figures."""

    chart: insights.Chart
    svg: SafeString
    headers: list[str]
    rows: list[list[str]]


def totals(summary: insights.Summary) -> list[tuple[str, str]]:
    """The range's totals, as the page lists them above the charts."""

    def count(name: str) -> str:
        return f"{summary.total(name):,}"

    def with_share(status: str) -> str:
        share = summary.share(status)
        return count(status) + ("" if share is None else f" ({share:.1%} of finished replies)")

    return [
        ("User messages", count("user_messages")),
        ("Replies", count("replies")),
        ("Active users (distinct over the range)", f"{summary.active_users:,}"),
        ("Prompt tokens", count("prompt_tokens")),
        ("Completion tokens", count("completion_tokens")),
        *((status.label, with_share(status.value)) for status in insights.FAILED),
        ("Rated up", count("rated_up")),
        ("Rated down", count("rated_down")),
    ]


def insights_view(request):
    today = timezone.localdate(timezone=timezone.get_default_timezone())
    context = {
        **admin.site.each_context(request),
        "title": "Insights",
        "presets": PRESETS,
        "time_zone": settings.TIME_ZONE,
        "max_days": insights.MAX_DAYS,
    }
    try:
        period, preset = chosen_range(request.GET, today)
    except RangeError as error:
        # The form keeps what was typed, to correct it.
        context.update(error=str(error), start=request.GET.get("from", ""))
        context["end"] = request.GET.get("to", "")
        return TemplateResponse(request, TEMPLATE, context, status=400)

    summary = insights.summary(period)
    shown = [
        ShownChart(chart, charts.render(chart), *chart.table())
        for chart in insights.charts(summary)
    ]
    context.update(
        period=period,
        preset=preset,
        start=period.start.isoformat(),
        end=period.end.isoformat(),
        totals=totals(summary),
        charts=shown,
    )
    return TemplateResponse(request, TEMPLATE, context)


# What the URL serves: staff only (see the module's docstring).
insights_page = admin.site.admin_view(insights_view)
