"""The admin's Insights page (conversations/admin_insights.py) and its figures (insights.py):
counts, nearest-rank percentiles, shares and ratings per day and per model, the range, staff
only, and a query count that does not grow with the data."""

from datetime import UTC, date, datetime, time, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import charts, insights, services
from conversations.insights import DateRange, Percentiles
from conversations.models import Message
from tests.test_pages import INLINE

pytestmark = pytest.mark.django_db

URL = "/admin/insights/"
# The range of the `log` fixture: two days with messages and one without.
MARCH = DateRange.between(date(2026, 3, 2), date(2026, 3, 4))
FIRST, SECOND, EMPTY = MARCH.days()


def at(day: date, minute: int = 0) -> datetime:
    """`minute` minutes after noon of `day`, in TIME_ZONE."""
    noon = datetime.combine(day, time(12))
    return timezone.make_aware(noon, timezone.get_default_timezone()) + timedelta(minutes=minute)


def ask(conversation, day: date, **fields) -> Message:
    return Message.objects.create(
        conversation=conversation, role="user", content="?", created_at=at(day), **fields
    )


def reply(conversation, day: date, model="alpha", *, ttft=None, tokens=None, total=500, **fields):
    """A reply of `model`: 10 prompt tokens, `tokens` completion tokens in `total` ms (the
    default 500 makes its tokens per second 2 * tokens)."""
    fields.setdefault("status", "ok")
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="!",
        created_at=at(day, minute=1),
        model=model,
        prompt_tokens=10,
        completion_tokens=tokens,
        ttft_ms=ttft,
        total_ms=total,
        **fields,
    )


@pytest.fixture
def log(owner, other_user):
    """Two days of messages, in the order nothing is sorted by: a day with two users and two
    models, a day with one user in two conversations, and messages on each side of MARCH."""
    first = services.create_conversation(owner=owner, title="First")
    theirs = services.create_conversation(owner=other_user, title="Theirs")
    second = services.create_conversation(owner=owner, title="Second")

    # FIRST: 3 user messages from 2 users; alpha's TTFT 10..100 and tokens/s 2..20, beta's
    # (400 ms, 100/s) and (1000 ms, 10/s); an error and a cancelled reply; 2 up, 1 down.
    ask(first, FIRST)
    ask(first, FIRST)
    ask(theirs, FIRST)
    for i in (7, 3, 10, 1, 5, 9, 2, 8, 4, 6):
        reply(first, FIRST, ttft=10 * i, tokens=i, rating=1 if i in (1, 2) else None)
    reply(theirs, FIRST, "beta", ttft=1000, tokens=5, rating=-1)
    reply(theirs, FIRST, "beta", ttft=400, tokens=50)
    reply(theirs, FIRST, "beta", ttft=99_999, tokens=1, status="error", error="Boom")
    reply(first, FIRST, ttft=5, tokens=2, status="cancelled")

    # SECOND: 3 user messages from one user in two conversations (one an edited version);
    # alpha's TTFT 5..100 and tokens/s 2..40, one reply with no TTFT (60/s), one with no time
    # (TTFT 7); an interrupted reply and one still being written; 1 up.
    ask(first, SECOND)
    ask(second, SECOND)
    ask(second, SECOND, is_active=False)
    for i in (20, 1, 19, 2, 18, 3, 17, 4, 16, 5, 15, 6, 14, 7, 13, 8, 12, 9, 11, 10):
        reply(second, SECOND, ttft=5 * i, tokens=i, rating=1 if i == 20 else None)
    reply(second, SECOND, ttft=None, tokens=30)
    reply(second, SECOND, ttft=7, tokens=3, total=0)
    reply(second, SECOND, ttft=None, tokens=None, status="interrupted")
    reply(second, SECOND, ttft=None, tokens=None, status="streaming")

    # Outside MARCH: the day before and the day after.
    for day in (FIRST - timedelta(days=1), EMPTY + timedelta(days=1)):
        ask(theirs, day)
        reply(theirs, day, "gamma", ttft=77_777, tokens=1, rating=-1, status="error")
    return first, theirs, second


def test_daily_counts(log):
    counts = insights.daily_counts(MARCH)

    assert set(counts) == {FIRST, SECOND}  # the empty day has no row; out of range, none
    assert counts[FIRST] == {
        "user_messages": 3,
        "replies": 14,
        "active_users": 2,
        "prompt_tokens": 140,
        "completion_tokens": 55 + 5 + 50 + 1 + 2,
        "ok": 12,
        "error": 1,
        "cancelled": 1,
        "interrupted": 0,
        "rated_up": 2,
        "rated_down": 1,
    }
    assert counts[SECOND] == {
        "user_messages": 3,
        "replies": 24,
        "active_users": 1,  # one owner, whatever the conversations and messages
        "prompt_tokens": 240,
        "completion_tokens": 210 + 30 + 3,
        "ok": 22,
        "error": 0,
        "cancelled": 0,
        "interrupted": 1,
        "rated_up": 1,
        "rated_down": 0,
    }
    assert insights.active_users(MARCH) == 2


def test_percentiles_by_day_are_nearest_rank_over_replies_that_ended_ok(log):
    found = insights.percentiles(MARCH)
    ttft, speed = found["ttft", "day"], found["tokens_per_second", "day"]

    # FIRST, 12 TTFTs (10..100, 400, 1000): ranks ceil(6) = 6 and ceil(11.4) = 12. The error
    # and the cancelled reply do not count.
    assert ttft[FIRST] == Percentiles(p50=60, p95=1000, count=12)
    # 12 speeds (2, 4, .., 20, 10, 100), sorted 2 4 6 8 10 10 12 ..: the 6th, the 12th.
    assert speed[FIRST] == Percentiles(p50=10.0, p95=100.0, count=12)
    # SECOND, 21 TTFTs (5, 7, 10, 15, .., 100; not the reply without one): the 11th and the 20th
    # (ceil(10.5), ceil(19.95)).
    assert ttft[SECOND] == Percentiles(p50=50, p95=95, count=21)
    # 21 speeds (2..40, 60; not the reply of no time): the 11th, 22, and the 20th, 40.
    assert speed[SECOND] == Percentiles(p50=22.0, p95=40.0, count=21)
    assert EMPTY not in ttft and EMPTY not in speed


def test_percentiles_by_model_cover_the_range(log):
    found = insights.percentiles(MARCH)
    ttft, speed = found["ttft", "model"], found["tokens_per_second", "model"]

    # alpha, 31 TTFTs: 5 7 10 10 15 20 20 .. 95 100 100: the 16th (ceil(15.5)) and the 30th.
    assert ttft == {
        "alpha": Percentiles(p50=50, p95=100, count=31),
        "beta": Percentiles(p50=400, p95=1000, count=2),  # of 2: the 1st and the 2nd
    }
    # alpha, 31 speeds: 2 2 4 4 .. 20 20 22 24 .. 40 60: the 16th and the 30th.
    assert speed == {
        "alpha": Percentiles(p50=16.0, p95=40.0, count=31),
        "beta": Percentiles(p50=10.0, p95=100.0, count=2),
    }


def test_summary_fills_every_day_and_totals_the_range(log):
    summary = insights.summary(MARCH)

    assert [day.day for day in summary.days] == [FIRST, SECOND, EMPTY]
    first, second, empty = summary.days
    assert (first.finished, second.finished, empty.finished) == (14, 23, 0)  # not streaming
    assert empty.replies == 0 and empty.ttft is None and empty.tokens_per_second is None
    assert [m.model for m in summary.models] == ["alpha", "beta"]
    assert summary.active_users == 2
    assert (summary.total("rated_up"), summary.total("rated_down")) == (3, 1)
    assert summary.share("error") == pytest.approx(1 / 37)
    assert summary.share("interrupted") == pytest.approx(1 / 37)


def test_status_shares_per_day(log):
    outcomes = next(c for c in insights.charts(insights.summary(MARCH)) if c.slug == "outcomes")

    shares = {series.name: series.values for series in outcomes.series}
    assert shares["Error"] == [pytest.approx(100 / 14), 0, None]
    assert shares["Cancelled"] == [pytest.approx(100 / 14), 0, None]
    assert shares["Interrupted"] == [0, pytest.approx(100 / 23), None]
    headers, rows = outcomes.table()
    assert headers[:2] == ["Day", "Error"]
    assert rows[0][:2] == ["2026-03-02", "7.1"]
    assert rows[2][1] == "—"


@pytest.mark.parametrize(
    ("zone", "hours", "expected"),
    [
        # 03:00 UTC on 3 March is the evening of 2 March in New York (UTC-5).
        ("America/New_York", [(3, 3)], {FIRST: 1}),
        # Paris moves to summer time on 29 March: that day runs from 23:00 UTC on the 28th to
        # 22:00 UTC on the 29th (23 hours).
        (
            "Europe/Paris",
            [(28, 22.5), (28, 23.5), (29, 21.5), (29, 22.5)],
            {date(2026, 3, 29): 2, date(2026, 3, 30): 1},  # the first is the 28th's
        ),
    ],
)
def test_days_follow_the_servers_time_zone(owner, settings, zone, hours, expected):
    settings.TIME_ZONE = zone
    conversation = services.create_conversation(owner=owner, title="Late")
    for day, hour in hours:
        created_at = datetime(2026, 3, day, tzinfo=UTC) + timedelta(hours=hour)
        Message.objects.create(conversation=conversation, role="user", created_at=created_at)
    period = DateRange.between(min(expected), max(expected))

    counts = insights.daily_counts(period)

    assert {day: row["user_messages"] for day, row in counts.items()} == expected


def test_staff_see_the_charts(admin_client, log):
    response = admin_client.get(URL, {"from": "2026-03-02", "to": "2026-03-04"})

    assert response.status_code == 200
    page = response.content.decode()
    for chart in insights.charts(insights.summary(MARCH)):
        assert f">{chart.title}</h2>" in page
        assert f"<title>{chart.title}</title>" in page
    assert page.count('<svg class="insights-chart"') == 9
    assert page.count('role="img" aria-label="') == 9
    assert page.count("<details>") == 9
    assert "conversations/insights.css" in page
    main = page[page.index('<div id="content-main"') :]
    assert not INLINE.search(main)
    assert "Active users (distinct over the range)</dt><dd>2</dd>" in page


def test_the_admin_index_links_to_the_page(admin_client):
    page = admin_client.get("/admin/").content.decode()

    assert f'href="{URL}"' in page


@pytest.mark.parametrize("logged_in", [True, False])
def test_others_are_sent_to_the_admin_login(client, owner, logged_in):
    if logged_in:
        client.force_login(owner)  # not staff

    response = client.get(URL)

    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={URL}"


def test_the_default_range_is_the_last_30_days(admin_client, owner):
    conversation = services.create_conversation(owner=owner, title="Recent")
    today = timezone.localdate()
    for days_ago in (0, 6, 7, 29, 30):
        ask(conversation, today - timedelta(days=days_ago))

    default = admin_client.get(URL).context
    week = admin_client.get(URL, {"days": "7"}).context

    assert (default["period"].start, default["period"].end) == (today - timedelta(29), today)
    assert default["preset"] == 30
    assert dict(default["totals"])["User messages"] == "4"  # not 30 days ago
    assert dict(week["totals"])["User messages"] == "2"  # today and 6 days ago
    assert week["period"].length == 7


def test_dates_choose_the_range(admin_client, log):
    context = admin_client.get(URL, {"from": "2026-03-03", "to": "2026-03-03"}).context

    assert [day.day for day in insights.summary(context["period"]).days] == [SECOND]
    assert dict(context["totals"])["User messages"] == "3"
    assert context["preset"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"from": "yesterday"}, "“yesterday” is not a date"),
        ({"from": "2026-03-02", "to": "2026-02-30"}, "To: “2026-02-30” is not a date"),
        ({"from": "2026-03-04", "to": "2026-03-02"}, "starts after it ends"),
        ({"from": "2024-01-01", "to": "2026-01-01"}, "the page draws at most 366"),
        ({"to": "2026-03-02"}, "first day"),
        ({"days": "5"}, "Choose the last 7, 30 or 90 days, or dates; not “5”."),
        ({"from": "0001-01-01", "to": "0001-01-02"}, "Dates run from 1970-01-01"),
    ],
)
def test_a_bad_range_is_a_400_that_says_why(admin_client, query, message):
    response = admin_client.get(URL, query)

    assert response.status_code == 400
    page = response.content.decode()
    assert 'class="errornote"' in page and message in page
    assert "insights-chart" not in page
    assert f'value="{query.get("from", "")}"' in page  # kept, to correct it


def test_lines_break_where_a_day_has_no_figure():
    chart = insights.Chart(
        "ttft",
        "TTFT",
        "",
        "lines",
        ["a", "b", "c", "d", "e"],
        [insights.Series("p50", [1, 2, None, 4, None])],
        "ms",
    )

    svg = charts.render(chart)

    assert svg.count("<polyline") == 1  # a-b; d stands alone
    assert svg.count("<circle") == 3
    assert "p50: lowest 1 (a), highest 4 (d)" in charts.describe(chart)


def test_ticks_are_round_and_whole_for_counts():
    assert charts.nice_ticks(7) == [0, 2, 4, 6, 8]
    assert charts.nice_ticks(1, whole=True) == [0, 1]
    assert charts.nice_ticks(0) == [0, 1]


def test_the_query_count_does_not_grow_with_the_data(admin_client, log, owner, other_user):
    """The same queries for two days of two models as for a month of four: no query a day or
    a model."""

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-31"}).status_code
        return len(captured.captured_queries)

    small = queries()
    conversation = services.create_conversation(owner=other_user, title="Busy")
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role="assistant" if i % 2 else "user",
            created_at=at(date(2026, 3, 1 + i % 30)),
            model=f"model-{i % 4}",
            ttft_ms=i,
            completion_tokens=i,
            total_ms=1000,
            rating=(1, -1, None)[i % 3],
        )
        for i in range(600)
    )

    assert queries() == small
    with CaptureQueriesContext(connection) as captured:
        insights.summary(DateRange.between(date(2026, 3, 1), date(2026, 3, 31)))
    assert len(captured.captured_queries) == insights.QUERIES
