"""One scale of the API benchmark, in a process of its own (its own temporary SQLite database).

    python -m benchmarks.api_worker --conversations 1000 --messages 100 --requests 100

Migrates a fresh database (CHATBOT_VAR_DIR / DATABASE_URL point at a temp dir: the caller sets
them), seeds it with bulk_create (the full-text search triggers fire for every row), then times
the listing endpoints and the admin's Insights page in-process through Django's test client and
counts their SQL queries with CaptureQueriesContext. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from datetime import date, timedelta

from .common import percentile

WORDS = (
    "the a of and to in is it that for you was with on as have be at one this from or had by "
    "word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take "
    "get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high "
    "lighthouse keeper river mountain story question answer model token context reply history"
).split()
BATCH = 5000
# Each endpoint is timed `--requests` times, or for this long (but at least MIN_REQUESTS times).
SECONDS_PER_ENDPOINT = 20
MIN_REQUESTS = 20
# The Insights page draws the longest preset's number of days from the first seeded day: every
# message of both scales falls in them (10 and 1,000 conversations an hour apart), so the two
# pages draw the same days and differ only in the rows they aggregate.
INSIGHTS_DAYS = 90


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, required=True)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    django.setup()
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    call_command("migrate", verbosity=0)
    setup_test_environment()  # lets the test client's host in; the database stays as it is
    seeded = seed(args.conversations, args.messages)
    result = {
        "seed": seeded,
        "endpoints": measure(seeded, args.requests),
        "insights": measure_insights(seeded, args.requests),
    }
    print(json.dumps(result))


def seed(conversations: int, messages: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from accounts.keys import issue_key
    from conversations.models import Conversation, Message

    rng = random.Random(42)
    user = get_user_model().objects.create_user("bench")  # no password: nothing to hash
    _, token = issue_key(user=user, name="benchmark")
    start = timezone.now() - timedelta(days=365)

    started = time.perf_counter()
    with transaction.atomic():
        rows = [
            Conversation(
                owner=user,
                title=_text(rng, 3, 7).capitalize(),
                system_prompt="You are a helpful AI assistant.",
                created_at=start + timedelta(hours=i),
                updated_at=start + timedelta(hours=i, minutes=messages),
            )
            for i in range(conversations)
        ]
        Conversation.objects.bulk_create(rows, batch_size=BATCH)
        conversations_seconds = time.perf_counter() - started
        batch: list = []
        for conversation in rows:
            question = None
            for j in range(messages):
                at = conversation.created_at + timedelta(seconds=30 * j)
                if j % 2 == 0:
                    question = Message(
                        conversation=conversation,
                        role="user",
                        content=_text(rng, 10, 30),
                        created_at=at,
                    )
                    batch.append(question)
                else:
                    batch.append(
                        Message(
                            conversation=conversation,
                            role="assistant",
                            content=_text(rng, 30, 80),
                            created_at=at,
                            reply_to=question,
                            version_group=question.pk,
                            model="SmolLM2-135M-Instruct",
                            prompt_tokens=40 + j * 30,
                            completion_tokens=60,
                            ttft_ms=80,
                            total_ms=1500,
                            context_turns=j,
                            generation_params={"max_new_tokens": 256, "temperature": 0.0},
                        )
                    )
                if len(batch) >= BATCH:
                    Message.objects.bulk_create(batch)
                    batch = []
        if batch:
            Message.objects.bulk_create(batch)
    seconds = time.perf_counter() - started
    total = conversations * messages
    middle = rows[len(rows) // 2]
    return {
        "conversations": conversations,
        "messages": total,
        "seconds": seconds,
        "conversations_seconds": conversations_seconds,
        "messages_per_s": total / (seconds - conversations_seconds),
        "token": token,
        "thread": str(middle.pk),
        "first_day": timezone.localtime(start).date().isoformat(),
    }


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def measure(seeded: dict, requests: int) -> dict:
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Token {seeded['token']}")
    thread = seeded["thread"]
    endpoints = {
        "conversations": "/api/conversations/",
        "conversations_page10": "/api/conversations/?page_size=10",
        "messages": f"/api/conversations/{thread}/messages/",
    }
    results = {}
    for name, url in endpoints.items():
        timed, response = _time(client, url, requests)
        body = response.json()
        results[name] = {**timed, "items": len(body["results"]), "count": body["count"]}
    return results


def measure_insights(seeded: dict, requests: int) -> dict:
    """The admin's Insights page over INSIGHTS_DAYS days holding every seeded message, as a
    staff user signed in to the admin sees it."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    staff = get_user_model().objects.create_user("operator", is_staff=True)
    client = Client()
    client.force_login(staff)
    first = date.fromisoformat(seeded["first_day"])
    last = first + timedelta(days=INSIGHTS_DAYS - 1)
    timed, response = _time(client, f"/admin/insights/?from={first}&to={last}", requests)
    assert b'class="insights-chart"' in response.content, response.content[:200]
    return {**timed, "days": INSIGHTS_DAYS, "messages": seeded["messages"]}


def _time(client, url: str, requests: int) -> tuple[dict, object]:
    """`url`'s SQL queries and p50/p95, and one response of it to check."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(5):  # warm-up: first requests import and compile
        assert client.get(url).status_code == 200
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, response.content[:200]
    # Read now: the log is cleared when the next request starts.
    queries = [q["sql"] for q in captured.captured_queries]
    times = []
    deadline = time.perf_counter() + SECONDS_PER_ENDPOINT
    while len(times) < min(requests, MIN_REQUESTS) or (
        len(times) < requests and time.perf_counter() < deadline
    ):
        started = time.perf_counter()
        client.get(url)
        times.append(time.perf_counter() - started)
    timed = {
        "url": url,
        "queries": len(queries),
        "sql": queries,
        "p50_ms": percentile(times, 50) * 1000,
        "p95_ms": percentile(times, 95) * 1000,
        "requests": len(times),
    }
    return timed, response


if __name__ == "__main__":
    main()
