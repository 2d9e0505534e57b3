"""Many streams in one web process take a few of PostgreSQL's connections: the process's
threads share a pool (DATABASE_POOL_SIZE), and a thread streaming a reply gives its connection
back while it waits for the engine (conversations/connections.py). One gunicorn server on the
test database, relaying replies from a simulated OpenAI-compatible server that writes each at a
fixed pace (benchmarks/simulated_engine.py), while the test counts the server's connections.

PostgreSQL only (skipped on SQLite): the point is a database server's connections.
"""

import threading
import time

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from accounts.keys import issue_key
from benchmarks.relay import SimulatedServer
from tests.live_server import Server, shared_database_url

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

STREAMS = 12
POOL = 2
APPLICATION = "streams-test-server"
PIECES = 30  # at 10 a second: each reply streams for 3 s, all of them at once


@pytest.fixture
def engine():
    server = SimulatedServer(tokens=PIECES, rate=10.0)
    yield server
    server.stop()


@pytest.fixture
def server(engine, tmp_path):
    host = Server(
        tmp_path,
        env={
            "DATABASE_URL": f"{shared_database_url()}?application_name={APPLICATION}",
            "DATABASE_POOL_SIZE": str(POOL),
            "CHATBOT_ENGINE_URL": f"{engine.url}/v1",
            "CHATBOT_ENGINE_MODEL": "simulated",
            "CHATBOT_MAX_NEW_TOKENS": str(PIECES),
            "CHATBOT_MESSAGES_PER_MINUTE": "0",
            "CHATBOT_CONVERSATIONS_PER_MINUTE": "0",
            "CHATBOT_REPLIES_PER_USER": "0",
        },
    )
    host.start()
    yield host
    host.stop()


def server_connections() -> int:
    """The server's connections to the database (named by their application_name)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [APPLICATION]
        )
        return cursor.fetchone()[0]


def test_a_dozen_streams_share_a_pool_of_two_connections(server, engine):
    user = get_user_model().objects.create_user("alice", password="correct-Horse-battery-9")
    _, key = issue_key(user=user, name="streams")
    headers = {"Authorization": f"Token {key}"}
    conversations = [
        httpx.post(f"{server.url}/api/conversations/", json={}, headers=headers, timeout=60)
        .raise_for_status()
        .json()["id"]
        for _ in range(STREAMS)
    ]
    outcomes: dict[str, dict] = {}

    def stream(conversation: str) -> None:
        url = f"{server.url}/api/conversations/{conversation}/messages/"
        body = {"content": "Tell me something.", "stream": True}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("done", "error"):
                    outcomes[conversation] = {"event": event, "data": line[6:]}

    threads = [threading.Thread(target=stream, args=(c,)) for c in conversations]
    for thread in threads:
        thread.start()
    most = 0
    while any(thread.is_alive() for thread in threads):
        most = max(most, server_connections())
        time.sleep(0.05)
    for thread in threads:
        thread.join()

    assert engine.stats()["peak_in_flight"] == STREAMS, "the replies streamed all at once"
    assert [o["event"] for o in outcomes.values()] == ["done"] * STREAMS, outcomes
    replies = httpx.get(
        f"{server.url}/api/conversations/{conversations[0]}/messages/", headers=headers
    ).json()["results"]
    assert replies[-1]["status"] == "ok"
    assert len(replies[-1]["content"].split()) == PIECES, "every piece of the reply stored"
    assert 1 <= most <= POOL, f"the server held {most} connections"
