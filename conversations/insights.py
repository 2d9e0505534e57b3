"""What the operator's Insights page (admin_insights.py) shows of a range of days: messages and
active users, tokens, time to first token and tokens per second, how replies ended, and their
ratings; and the charts that draw them (charts.py renders them as SVG).

Days are the server's TIME_ZONE's. Every figure is aggregated in the database, and a range costs
the same queries whatever its length or the rows in it (QUERIES): one GROUP BY a day for the
counts, one for the users active over the whole range, and one for every percentile (time to
first token and tokens per second, by day and by model). No query runs per day or per model, and
no row is fetched to be counted in Python.

Every version of a message counts (a regenerated reply was written and cost its tokens too).

Percentiles are nearest-rank. Of n values sorted ascending, x_1 <= ... <= x_n, the p-th
percentile is x_k with k = ceil(p * n / 100) (at least 1): the smallest value that p% of the
values are at or below, always one of them, never interpolated. Of 10 values p50 is the 5th and
p95 the 10th; of 20 values, the 10th and the 19th; of one value, that value for both. In SQL:
ROW_NUMBER() OVER (PARTITION BY the group ORDER BY the value) = (n * p + 99) / 100 with n its
COUNT(*) OVER the same partition: the same rounding up in integer division, as SQLite has no
CEIL unless built with its math functions. They take only the replies that ended ok with the
figure recorded; tokens per second is completion_tokens / total_ms * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Literal

from django.db import connections
from django.db.models import Case, Count, F, FloatField, IntegerField, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Cast
from django.utils import timezone

from .models import Message

# The longest range the page draws: a year, leap day included.
MAX_DAYS = 366
PRESETS = (7, 30, 90)
DEFAULT_DAYS = 30
# The dates a range may take: any real one, short of the calendar's end (the day after the last
# is where its query stops).
EARLIEST, LATEST = date(1970, 1, 1), date.max - timedelta(days=1)
# The queries of summary(), whatever the range or the data (see the module's docstring).
QUERIES = 3
PERCENTILES = (50, 95)
# How a reply may end short of ok, in the order the page lists them.
FAILED = (Message.Status.ERROR, Message.Status.CANCELLED, Message.Status.INTERRUPTED)
NO_MODEL = "(no model)"


class RangeError(ValueError):
    """A range the page cannot draw; its message says why, for the operator."""


@dataclass(frozen=True)
class DateRange:
    """The days from `start` to `end`, both included, in the server's TIME_ZONE."""

    start: date
    end: date

    @classmethod
    def last(cls, days: int, today: date | None = None) -> DateRange:
        """The last `days` days, today included."""
        today = today or timezone.localdate(timezone=timezone.get_default_timezone())
        return cls(today - timedelta(days=days - 1), today)

    @classmethod
    def between(cls, start: date, end: date) -> DateRange:
        if start < EARLIEST or end > LATEST:
            raise RangeError(f"Dates run from {EARLIEST} to {LATEST}.")
        if start > end:
            raise RangeError(f"The range starts after it ends: {start} is later than {end}.")
        if (end - start).days + 1 > MAX_DAYS:
            raise RangeError(
                f"The range from {start} to {end} is {(end - start).days + 1} days long; "
                f"the page draws at most {MAX_DAYS}."
            )
        return cls(start, end)

    @property
    def length(self) -> int:
        return (self.end - self.start).days + 1

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range(self.length)]

    def midnights(self) -> list[datetime]:
        """Each day's first instant, and the next day's after the last: aware, in TIME_ZONE
        (a day of a change to or from daylight saving time is 23 or 25 hours long)."""
        zone = timezone.get_default_timezone()
        return [
            timezone.make_aware(datetime.combine(self.start + timedelta(days=i), time.min), zone)
            for i in range(self.length + 1)
        ]


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    count: int  # the values they were taken of


# What percentiles are taken of, for each reply that ended ok: its time to first token, and its
# tokens per second where it has a time to divide by (cast first: PostgreSQL divides integers as
# integers, and would fail on a zero that the CASE leaves out). Each is NULL where it is missing.
FIGURES = {
    "ttft": F("ttft_ms"),
    "tokens_per_second": Case(
        When(
            Q(completion_tokens__isnull=False, total_ms__gt=0),
            then=Cast("completion_tokens", FloatField()) * 1000 / F("total_ms"),
        ),
        output_field=FloatField(),
    ),
}
GROUPINGS = ("day", "model")


@dataclass(frozen=True)
class Day:
    day: date
    user_messages: int = 0
    replies: int = 0
    active_users: int = 0  # distinct owners of the conversations their messages went to
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ok: int = 0
    error: int = 0
    cancelled: int = 0
    interrupted: int = 0
    rated_up: int = 0
    rated_down: int = 0
    ttft: Percentiles | None = None
    tokens_per_second: Percentiles | None = None

    @property
    def finished(self) -> int:
        """Replies that ended, one way or another (not those still being written)."""
        return self.ok + self.error + self.cancelled + self.interrupted


@dataclass(frozen=True)
class ModelFigures:
    model: str
    ttft: Percentiles | None
    tokens_per_second: Percentiles | None


@dataclass(frozen=True)
class Summary:
    period: DateRange
    days: list[Day]
    models: list[ModelFigures]
    active_users: int  # distinct over the whole range (not the sum of the days')

    def total(self, name: str) -> int:
        return sum(getattr(day, name) for day in self.days)

    def share(self, status: str) -> float | None:
        """The share (0..1) of the range's finished replies that ended with `status`."""
        finished = self.total("finished")
        return self.total(status) / finished if finished else None


def _messages(period: DateRange) -> QuerySet:
    midnights = period.midnights()
    start, end = midnights[0], midnights[-1]
    return Message.objects.filter(created_at__gte=start, created_at__lt=end).order_by()


def _day(period: DateRange):
    """Which day of `period` a message falls on, 0 for its first: a CASE that halves the range's
    midnights at each step, so that a row meets about log2(days) comparisons of its created_at.

    Rather than TruncDate, which SQLite answers with a Python function called for every row: at
    100k messages that was ~40% of the page's time (benchmarks/api.py). The midnights are
    reckoned here, in TIME_ZONE, daylight saving time included."""
    midnights = period.midnights()

    def days(first: int, end: int):
        if end - first == 1:
            return Value(first)
        middle = (first + end) // 2
        return Case(
            When(created_at__lt=midnights[middle], then=days(first, middle)),
            default=days(middle, end),
            output_field=IntegerField(),
        )

    return days(0, period.length)


def daily_counts(period: DateRange) -> dict[date, dict[str, int]]:
    """Each day's counts of the range that has messages (one query): messages by role, active
    users, tokens, replies by status, ratings."""
    user, reply = Q(role=Message.Role.USER), Q(role=Message.Role.ASSISTANT)
    rows = (
        _messages(period)
        .annotate(day=_day(period))
        .values("day")
        .annotate(
            user_messages=Count("pk", filter=user),
            replies=Count("pk", filter=reply),
            active_users=Count("conversation__owner", filter=user, distinct=True),
            prompt_tokens=Sum("prompt_tokens", filter=reply),
            completion_tokens=Sum("completion_tokens", filter=reply),
            **{
                status.value: Count("pk", filter=reply & Q(status=status))
                for status in (Message.Status.OK, *FAILED)
            },
            rated_up=Count("pk", filter=reply & Q(rating=Message.Rating.UP)),
            rated_down=Count("pk", filter=reply & Q(rating=Message.Rating.DOWN)),
        )
    )
    # Sums of no rows are NULL. (A range of one day groups by a constant, which is no grouping:
    # one row comes back, of zeros if there were no messages.)
    days = {period.start + timedelta(days=row.pop("day")): row for row in rows}
    return {
        day: {k: v or 0 for k, v in row.items()} for day, row in days.items() if any(row.values())
    }


def active_users(period: DateRange) -> int:
    """Distinct owners of the conversations a user message went to in the range."""
    users = _messages(period).filter(role=Message.Role.USER)
    return users.aggregate(n=Count("conversation__owner", distinct=True))["n"]


def percentiles(period: DateRange) -> dict[tuple[str, str], dict]:
    """p50 and p95 of each of FIGURES over the range's replies that ended ok, by day and by
    model, in one query: {(figure, "day" or "model"): {the day or model: Percentiles}}.

    The replies are read once (a CTE, which both databases materialize as it is used more than
    once: each row's day is reckoned once), then each figure is ranked in each grouping and only
    the rows at the ranks come back: at most two a group. Nearest-rank: see the module's
    docstring."""
    replies = (
        _messages(period)
        .filter(role=Message.Role.ASSISTANT, status=Message.Status.OK)
        .annotate(day=_day(period), **FIGURES)
        .values("day", "model", *FIGURES)
    )
    inner, params = replies.query.sql_with_params()
    branches = " UNION ALL ".join(_ranked(figure, by) for figure in FIGURES for by in GROUPINGS)
    at_ranks = " OR ".join(f'"rank" = ("size" * {p} + 99) / 100' for p in PERCENTILES)
    sql = (
        f'WITH "replies" AS ({inner}) SELECT "figure", "grouping", "day", "model", "value", '
        f'"rank", "size" FROM ({branches}) AS "ranked" WHERE {at_ranks}'
    )
    found: dict = {(figure, by): {} for figure in FIGURES for by in GROUPINGS}
    with connections[replies.db].cursor() as cursor:
        cursor.execute(sql, params)
        for figure, by, day, model, value, rank, size in cursor.fetchall():
            key = period.start + timedelta(days=day) if by == "day" else model
            figures = found[figure, by].setdefault(key, {"count": size})
            for p in PERCENTILES:
                if rank == (size * p + 99) // 100:
                    figures[f"p{p}"] = value
    return {
        group: {key: Percentiles(**figures) for key, figures in keyed.items()}
        for group, keyed in found.items()
    }


def _ranked(figure: str, by: str) -> str:
    """One figure's values in one grouping, each with its rank in its group and the group's
    size; the other grouping's column NULL."""
    keys = ", ".join(f'"{key}"' if key == by else f'NULL AS "{key}"' for key in GROUPINGS)
    return (
        f'SELECT \'{figure}\' AS "figure", \'{by}\' AS "grouping", {keys}, "{figure}" AS "value", '
        f'ROW_NUMBER() OVER (PARTITION BY "{by}" ORDER BY "{figure}") AS "rank", '
        f'COUNT(*) OVER (PARTITION BY "{by}") AS "size" '
        f'FROM "replies" WHERE "{figure}" IS NOT NULL'
    )


def summary(period: DateRange) -> Summary:
    """Everything the page shows of `period`, in QUERIES queries."""
    counts = daily_counts(period)
    found = percentiles(period)
    ttft, speed = found["ttft", "day"], found["tokens_per_second", "day"]
    days = [
        Day(day, **counts.get(day, {}), ttft=ttft.get(day), tokens_per_second=speed.get(day))
        for day in period.days()
    ]
    ttft, speed = found["ttft", "model"], found["tokens_per_second", "model"]
    models = [
        ModelFigures(model or NO_MODEL, ttft.get(model), speed.get(model))
        for model in sorted(ttft.keys() | speed.keys())
    ]
    return Summary(period, days, models, active_users(period))


# --- the charts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    name: str
    values: list[float | None]  # one a category; None: no figure (a gap in a line)
    # A colour that means something (insights.css: error, cancelled, interrupted, up, down);
    # else the chart's next colour.
    tone: str = ""
    decimals: int | None = None  # None: the chart's


@dataclass(frozen=True)
class Chart:
    """One chart of the page, as data: charts.py draws it, the template tabulates it."""

    slug: str  # its id on the page
    title: str
    description: str  # what it counts, in a sentence
    kind: Literal["bars", "stacked", "lines"]
    categories: list[str]  # the x axis: days, or models
    series: list[Series]
    unit: str  # the y axis's title
    decimals: int = 0
    category: str = "Day"  # the x axis's title
    # Figures shown in the table under the chart but not drawn (counts behind shares, say).
    extra: list[Series] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The chart's figures as a table: a column a series, a row a category."""
        columns = [*self.series, *self.extra]
        rows = [
            [category, *(_format(s.values[i], _decimals(s, self)) for s in columns)]
            for i, category in enumerate(self.categories)
        ]
        return [self.category, *(s.name for s in columns)], rows


def _decimals(series: Series, chart: Chart) -> int:
    return chart.decimals if series.decimals is None else series.decimals


def _format(value: float | None, decimals: int) -> str:
    return "—" if value is None else f"{value:,.{decimals}f}"


def _figure(percentiles: Percentiles | None, p: int) -> float | None:
    return None if percentiles is None else getattr(percentiles, f"p{p}")


def _share(day: Day, status: str) -> float | None:
    return 100 * getattr(day, status) / day.finished if day.finished else None


def _percentile_series(rows: list, attribute: str) -> list[Series]:
    """p50 and p95 of `attribute` (Percentiles or None) of each row (a Day or ModelFigures)."""
    return [
        Series(f"p{p}", [_figure(getattr(row, attribute), p) for row in rows]) for p in PERCENTILES
    ]


def _measured(rows: list, attribute: str) -> Series:
    counts = [getattr(row, attribute).count if getattr(row, attribute) else 0 for row in rows]
    return Series("Replies measured", counts, decimals=0)


# Each percentile figure's unit, decimals and what it is, for its charts.
PERCENTILE_CHARTS = {
    "ttft": ("Time to first token", "milliseconds", 0, ""),
    "tokens_per_second": (
        "Tokens per second",
        "tokens per second",
        1,
        "Completion tokens over the reply's total time: ",
    ),
}


def _percentile_chart(summary: Summary, attribute: str, by: Literal["day", "model"]) -> Chart:
    """A figure's p50 and p95: a line a day, or a bar a model."""
    name, unit, decimals, what = PERCENTILE_CHARTS[attribute]
    if by == "day":
        rows, categories = summary.days, [day.day.isoformat() for day in summary.days]
    else:
        rows, categories = summary.models, [figures.model for figures in summary.models]
    return Chart(
        f"{attribute}-by-{by}".replace("_", "-"),
        f"{name} per day" if by == "day" else f"{name} by model",
        f"{what}p50 and p95 (nearest rank) over the {'day' if by == 'day' else 'range'}'s "
        "replies that ended ok.",
        "lines" if by == "day" else "bars",
        categories,
        _percentile_series(rows, attribute),
        unit,
        decimals=decimals,
        category=by.capitalize(),
        extra=[_measured(rows, attribute)],
    )


def charts(summary: Summary) -> list[Chart]:
    """The page's charts, in its order."""
    days = summary.days
    labels = [day.day.isoformat() for day in days]

    def daily(name: str, attribute: str, tone: str = "") -> Series:
        # Counts, whole in any chart's table.
        return Series(name, [getattr(day, attribute) for day in days], tone, decimals=0)

    failed = [(status.value, status.label) for status in FAILED]
    return [
        Chart(
            "messages",
            "Messages per day",
            "Messages users sent and replies written (every version).",
            "bars",
            labels,
            [daily("User messages", "user_messages"), daily("Replies", "replies")],
            "messages",
        ),
        Chart(
            "active-users",
            "Active users per day",
            "Distinct owners of the conversations a user message went to that day.",
            "bars",
            labels,
            [daily("Active users", "active_users")],
            "users",
        ),
        Chart(
            "tokens",
            "Tokens per day",
            "Prompt and completion tokens, summed over the day's replies.",
            "stacked",
            labels,
            [
                daily("Prompt tokens", "prompt_tokens"),
                daily("Completion tokens", "completion_tokens"),
            ],
            "tokens",
        ),
        *(
            _percentile_chart(summary, attribute, by)
            for by in GROUPINGS
            for attribute in PERCENTILE_CHARTS
        ),
        Chart(
            "outcomes",
            "Replies that did not end ok, per day",
            "Share of the day's finished replies (not those still being written) that ended "
            "in an error, were stopped by their user, or were cut off by the server stopping.",
            "stacked",
            labels,
            [
                Series(label, [_share(day, status) for day in days], tone=status)
                for status, label in failed
            ],
            "% of finished replies",
            decimals=1,
            extra=[
                daily("Finished replies", "finished"),
                *(daily(f"{label} (count)", status) for status, label in failed),
            ],
        ),
        Chart(
            "feedback",
            "Feedback per day",
            "Replies written that day that their owner rated up or down.",
            "bars",
            labels,
            [daily("Rated up", "rated_up", "up"), daily("Rated down", "rated_down", "down")],
            "replies",
        ),
    ]
