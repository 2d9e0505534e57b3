"""Full-text search of conversations: matching, ranking, ownership, the index kept in step with
writes, hostile input, pagination, query counts, the index really being used, and escaping.

Runs on SQLite (the default) and on PostgreSQL (`.ci/postgres-tests`); assertions about one
database's index are skipped on the other.
"""

import re
from datetime import timedelta
from importlib import import_module

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import search, services
from conversations.models import Conversation, Message
from conversations.search import MATCH_END, MATCH_START, Snippet, query_terms, search_conversations
from tests.factories import make_conversation

pytestmark = pytest.mark.django_db

SEARCH_MIGRATION = import_module("conversations.migrations.0003_search_index")
on_sqlite = pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite FTS5 index")
on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL GIN indexes"
)

HOSTILE_QUERIES = [
    '"',
    '""',
    "*",
    "NEAR(",
    "NEAR(a b, 2)",
    "-foo",
    "a:b",
    "()",
    "title:needle",
    "needle OR",
    "AND OR NOT",
    "'",
    "\\",
    ":*",
    "!&|<->",
    "%_%",
    "a\x00b",
    "🦜",
    "🦜 needle 🦜",
    "x" * 500,
    "needle " * 100,
    "{content}: ^needle",
]


def found(owner, query) -> list:
    return [conversation.pk for conversation in search_conversations(owner=owner, query=query)]


def api_ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["results"]]


# --- matching ------------------------------------------------------------------------------------


def test_finds_titles_and_message_text(owner):
    by_title = make_conversation(owner, "Holiday planning for Lisbon")
    by_text = make_conversation(owner, "Travel", texts=["Which museums are open in Lisbon?"])
    make_conversation(owner, "Recipes", texts=["How long do I boil an egg?"])

    assert set(found(owner, "lisbon")) == {by_title.pk, by_text.pk}
    assert found(owner, "museums") == [by_text.pk]
    assert found(owner, "holiday") == [by_title.pk]
    assert found(owner, "volcano") == []


def test_every_word_must_match_and_case_does_not_matter(owner):
    both = make_conversation(owner, texts=["Python generators", "and async iterators"])
    make_conversation(owner, texts=["Python decorators"])

    assert found(owner, "PYTHON iterators") == [both.pk]


def test_words_may_match_in_different_messages_and_the_title(owner):
    conversation = make_conversation(
        owner, "Lisbon trip", texts=["Which museums are open?", "Most of them, on Sundays."]
    )
    make_conversation(owner, "Porto trip", texts=["Which museums are open?"])

    assert found(owner, "lisbon museums sundays") == [conversation.pk]


def test_the_last_word_matches_as_a_prefix(owner):
    conversation = make_conversation(owner, texts=["Explain quantum entanglement"])

    assert found(owner, "quant") == [conversation.pk]
    assert found(owner, "explain entangl") == [conversation.pk]
    # Only the last word is a prefix: the others must be whole words.
    assert found(owner, "quant entanglement") == []


def test_word_forms_match(owner):
    conversation = make_conversation(owner, texts=["She runs every morning"])

    assert found(owner, "running") == [conversation.pk]


@on_sqlite
def test_diacritics_are_ignored_on_sqlite(owner):
    conversation = make_conversation(owner, texts=["Un café à Montréal"])

    assert found(owner, "cafe montreal") == [conversation.pk]
    assert found(owner, "Café") == [conversation.pk]


# --- ranking -------------------------------------------------------------------------------------


def test_a_conversation_that_matches_more_ranks_first(owner):
    now = timezone.now()
    many = make_conversation(
        owner,
        texts=["The gardener grows tomatoes", "Tomatoes need sun", "Water the tomatoes daily"],
        updated_at=now - timedelta(days=3),
    )
    one = make_conversation(
        owner,
        texts=["Tomatoes are fine", "Something else entirely", "And more of it"],
        updated_at=now,  # the most recent does not win on recency alone
    )

    assert found(owner, "tomatoes") == [many.pk, one.pk]
    results = list(search_conversations(owner=owner, query="tomatoes"))
    assert results[0].search_rank > results[1].search_rank


def test_a_title_match_weighs_more_than_the_same_match_in_a_message(owner):
    now = timezone.now()
    in_title = make_conversation(owner, "Volcano", updated_at=now - timedelta(days=1))
    in_text = make_conversation(owner, "Geology", texts=["Volcano"], updated_at=now)

    assert found(owner, "volcano") == [in_title.pk, in_text.pk]


# --- ownership -----------------------------------------------------------------------------------


def test_only_the_owners_conversations_are_found(owner, other_user, api, owner_client):
    mine = make_conversation(owner, "My secret recipe", texts=["saffron risotto"])
    theirs = make_conversation(other_user, "Their secret recipe", texts=["saffron risotto"])

    assert found(owner, "saffron") == [mine.pk]
    assert found(other_user, "saffron") == [theirs.pk]

    assert api_ids(api.get("/api/conversations/", {"q": "saffron"})) == [str(mine.pk)]
    assert api_ids(api.get("/api/conversations/", {"q": "their"})) == []

    page = owner_client.get("/", {"q": "secret recipe"}).content.decode()
    assert str(mine.pk) in page
    assert str(theirs.pk) not in page
    assert "Their secret recipe" not in page


def test_the_api_search_needs_authentication(anon_api):
    assert anon_api.get("/api/conversations/", {"q": "anything"}).status_code == 401


# --- the index follows writes --------------------------------------------------------------------


def test_a_message_added_later_is_found(owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    assert found(owner, "aubergine") == []

    services.post_message(conversation=conversation, content="Grill an aubergine")

    assert found(owner, "aubergine") == [conversation.pk]


def test_bulk_created_messages_are_found(owner):
    conversation = make_conversation(owner, "Chat")
    Message.objects.bulk_create(
        Message(conversation=conversation, role=Message.Role.USER, content=f"parsnip {i}")
        for i in range(3)
    )

    assert found(owner, "parsnip") == [conversation.pk]


def test_an_edited_message_is_found_by_its_new_words_only(owner):
    conversation = make_conversation(owner, texts=["I like turnips"])
    message = conversation.messages.get()

    message.content = "I like radishes"
    message.save()
    assert found(owner, "turnips") == []
    assert found(owner, "radishes") == [conversation.pk]

    Message.objects.filter(pk=message.pk).update(content="I like celery")
    assert found(owner, "radishes") == []
    assert found(owner, "celery") == [conversation.pk]


def test_a_renamed_conversation_is_found_by_its_new_title(owner, api):
    conversation = make_conversation(owner, "Old name")

    response = api.patch(f"/api/conversations/{conversation.pk}/", {"title": "Fresh label"})
    assert response.status_code == 200
    assert found(owner, "old") == []
    assert found(owner, "fresh") == [conversation.pk]


def test_a_deleted_message_is_no_longer_found(owner):
    conversation = make_conversation(owner, texts=["keep this", "drop the kumquat"])
    conversation.messages.get(content__contains="kumquat").delete()

    assert found(owner, "kumquat") == []
    assert found(owner, "keep") == [conversation.pk]


def test_a_deleted_conversation_is_gone_from_results(owner, api):
    doomed = make_conversation(owner, "Doomed chat", texts=["pomegranate"] * 3)
    kept = make_conversation(owner, "Kept chat", texts=["pomegranate"])

    assert api.delete(f"/api/conversations/{doomed.pk}/").status_code == 204

    assert found(owner, "pomegranate") == [kept.pk]
    assert found(owner, "doomed") == []
    if connection.vendor == "sqlite":
        assert sqlite_index_rows() == Conversation.objects.count() + Message.objects.count()


# --- hostile input -------------------------------------------------------------------------------


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries_do_not_fail(owner, api, owner_client, query):
    make_conversation(owner, "needle", texts=["a needle in a haystack: foo (bar) NEAR baz"])

    results = list(search_conversations(owner=owner, query=query))
    assert all(conversation.owner_id == owner.pk for conversation in results)

    response = api.get("/api/conversations/", {"q": query})
    assert response.status_code == 200, response.content
    assert response.json()["count"] == len(results)

    assert owner_client.get("/", {"q": query}).status_code == 200


@pytest.mark.parametrize("query", ["", "   ", '"', "()", "*", "-", "🦜🦜", "::"])
def test_queries_without_words_find_nothing(owner, query):
    make_conversation(owner, "Anything", texts=["anything at all"])

    assert query_terms(query) == []
    assert found(owner, query) == []


def test_query_syntax_is_searched_as_words(owner):
    conversation = make_conversation(owner, texts=["foo NEAR bar"])
    make_conversation(owner, texts=["foo alone"])

    assert found(owner, "NEAR(") == [conversation.pk]
    assert found(owner, '"foo" -bar') == [conversation.pk]


def test_blank_q_lists_everything(owner, api, owner_client):
    make_conversation(owner, "First")
    make_conversation(owner, "Second")

    assert len(api_ids(api.get("/api/conversations/", {"q": "  "}))) == 2
    page = owner_client.get("/", {"q": ""}).content.decode()
    assert "First" in page and "Second" in page
    assert "No chats match" not in page


# --- the API -------------------------------------------------------------------------------------


def test_api_search_is_best_first_and_paginated(owner, api):
    now = timezone.now()
    # The i-th conversation has i matching messages; the newest matches least.
    by_matches = [
        make_conversation(
            owner,
            f"chat {i}",
            texts=["lorem mango ipsum"] * i + ["unrelated words"] * (5 - i),
            updated_at=now - timedelta(hours=i),
        )
        for i in range(1, 6)
    ]
    make_conversation(owner, "no match", texts=["nothing"])
    expected = [str(c.pk) for c in reversed(by_matches)]

    first = api.get("/api/conversations/", {"q": "mango", "page_size": 2}).json()
    assert first["count"] == 5
    assert [item["id"] for item in first["results"]] == expected[:2]
    assert "q=mango" in first["next"]

    second = api.get(first["next"]).json()
    assert [item["id"] for item in second["results"]] == expected[2:4]
    third = api.get(second["next"]).json()
    assert [item["id"] for item in third["results"]] == expected[4:]
    assert third["next"] is None


def test_api_results_have_the_usual_fields_and_a_plain_snippet(owner, api):
    conversation = make_conversation(
        owner, "Birds", texts=["The kestrel hovers over fields", "reply"]
    )

    item = api.get("/api/conversations/", {"q": "kestrel"}).json()["results"][0]

    assert item["id"] == str(conversation.pk)
    assert item["title"] == "Birds"
    assert item["message_count"] == 2
    assert {"system_prompt", "created_at", "updated_at"} <= set(item)
    assert "kestrel" in item["snippet"]
    assert MATCH_START not in item["snippet"] and MATCH_END not in item["snippet"]

    plain = api.get("/api/conversations/").json()["results"][0]
    assert "snippet" not in plain


def test_query_count_does_not_grow_with_the_number_of_results(owner, api):
    def queries_for(query):
        with CaptureQueriesContext(connection) as context:
            response = api.get("/api/conversations/", {"q": query})
        assert response.status_code == 200
        return len(context.captured_queries), response.json()["count"]

    for i in range(2):
        make_conversation(owner, texts=[f"walnut {i}", "reply"])
    for i in range(8):
        make_conversation(owner, texts=[f"hazelnut {i}", "reply", "hazelnut again"])

    few, few_count = queries_for("walnut")
    many, many_count = queries_for("hazelnut")
    assert (few_count, many_count) == (2, 8)
    assert few == many


def test_search_costs_three_queries(owner, django_assert_num_queries):
    for i in range(6):
        make_conversation(owner, f"chat {i}", texts=["almond"] * (i + 1))

    results = search_conversations(owner=owner, query="almond")
    with django_assert_num_queries(3):  # ranking, conversations, snippets
        page = results[0:4]
        assert len(results) == 6
        assert [c.message_count for c in page] == [6, 5, 4, 3]
        assert all("almond" in str(c.snippet) for c in page)


def test_schema_documents_the_q_parameter(api):
    schema = api.get("/api/schema/", {"format": "json"}).json()
    parameters = schema["paths"]["/api/conversations/"]["get"]["parameters"]
    assert "q" in {parameter["name"] for parameter in parameters}


# --- the page ------------------------------------------------------------------------------------


def test_page_has_a_search_box(owner_client):
    page = owner_client.get("/").content.decode()
    assert re.search(r'<form method="get"[^>]*role="search"', page)
    assert 'name="q"' in page


def test_page_search_box_takes_as_much_as_the_search_reads(owner_client):
    for page in (owner_client.get("/"), owner_client.post("/new/", {"content": ""})):
        assert f'maxlength="{search.MAX_QUERY_CHARS}"' in page.content.decode()


def test_page_lists_results_best_first_with_highlighted_snippets(owner, owner_client):
    one = make_conversation(owner, "Few", texts=["a cactus in the window"])
    many = make_conversation(owner, "Many", texts=["cactus care", "water the cactus rarely"])
    make_conversation(owner, "Other", texts=["ferns"])

    page = owner_client.get("/", {"q": "cactus"}).content.decode()

    assert page.index(str(many.pk)) < page.index(str(one.pk))
    assert "Other" not in page
    assert "<mark>cactus</mark>" in page
    assert 'value="cactus"' in page


def test_page_without_matches_says_so(owner, owner_client):
    make_conversation(owner, "Something")

    page = owner_client.get("/", {"q": "<b>nothing</b>"}).content.decode()

    assert "No chats match “&lt;b&gt;nothing&lt;/b&gt;”" in page
    assert "<b>nothing</b>" not in page


def test_page_snippets_are_escaped(owner, owner_client):
    make_conversation(owner, "XSS", texts=['<script>alert("pwned")</script> <mark>pwned</mark>'])

    page = owner_client.get("/", {"q": "pwned"}).content.decode()

    assert "<script>alert" not in page and 'alert("' not in page
    assert "alert(&quot;" in page and "&lt;/script&gt;" in page
    assert "<mark>pwned</mark>" in page  # our highlight
    assert "&lt;mark&gt;" in page  # the user's text, escaped


def test_page_pager_keeps_the_query(owner, owner_client, monkeypatch):
    monkeypatch.setattr("conversations.pages.chats.CONVERSATIONS_PER_PAGE", 2)
    for i in range(3):
        make_conversation(owner, f"chat {i}", texts=["plum"])

    page = owner_client.get("/", {"q": "plum"}).content.decode()
    assert 'href="?q=plum&amp;page=2"' in page
    second = owner_client.get("/", {"q": "plum", "page": 2}).content.decode()
    assert "Page 2 of 2" in second


def test_snippet_parts():
    snippet = Snippet(f"…the {MATCH_START}red{MATCH_END} fox and {MATCH_START}red{MATCH_END}")
    assert list(snippet) == [("…the ", False), ("red", True), (" fox and ", False), ("red", True)]
    assert str(snippet) == "…the red fox and red"
    assert not Snippet(None)
    # Stray marks (from the text itself) never leak and never break the parts.
    assert str(Snippet(f"a{MATCH_END}b{MATCH_START}")) == "ab"


# --- the index is real ---------------------------------------------------------------------------


def sqlite_index_rows() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM conversations_search")
        return cursor.fetchone()[0]


@on_sqlite
def test_sqlite_fts5_table_holds_every_message_and_title(owner, other_user):
    conversation = make_conversation(owner, "Indexed", texts=["zucchini bread", "reply"])
    make_conversation(other_user, "Other", texts=["zucchini soup"])

    with connection.cursor() as cursor:
        cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'conversations_search'")
        assert "fts5" in cursor.fetchone()[0].lower()
        assert sqlite_index_rows() == Conversation.objects.count() + Message.objects.count()
        cursor.execute(
            "SELECT conversation_id, content FROM conversations_search "
            "WHERE conversations_search MATCH ? ORDER BY rank",
            ['"zucchini" "bread"'],
        )
        assert cursor.fetchall() == [(conversation.pk.hex, "zucchini bread")]


@on_sqlite
def test_sqlite_search_is_an_fts5_match(owner):
    make_conversation(owner, texts=["okra"])
    with CaptureQueriesContext(connection) as context:
        list(search_conversations(owner=owner, query="okra"))
    ranking_sql = context.captured_queries[0]["sql"]
    assert "MATCH" in ranking_sql and "LIKE" not in ranking_sql.upper()

    with connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN QUERY PLAN SELECT conversation_id FROM conversations_search "
            "WHERE conversations_search MATCH ?",
            ['"okra"'],
        )
        plan = " ".join(str(row[-1]) for row in cursor.fetchall())
    assert "VIRTUAL TABLE INDEX" in plan


@on_sqlite
def test_sqlite_triggers_exist_after_all_migrations():
    # A later migration that rebuilds conversations_message or conversations_conversation on
    # SQLite drops their triggers; it must recreate them (create_sqlite_triggers).
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        triggers = {row[0] for row in cursor.fetchall()}
    assert set(SEARCH_MIGRATION.SQLITE_TRIGGERS) <= triggers


@on_postgresql
def test_postgresql_search_uses_the_gin_indexes(owner):
    make_conversation(owner, "Indexed zucchini", texts=["zucchini bread"])
    with CaptureQueriesContext(connection) as context:
        assert len(found(owner, "zucchini")) == 1
    ranking_sql = context.captured_queries[0]["sql"]
    assert "LIKE" not in ranking_sql.upper()

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE indexname IN "
            "('conversations_message_search', 'conversations_conversation_search')"
        )
        assert len(cursor.fetchall()) == 2
        # The search matches with exactly the indexed expressions, so the GIN indexes apply.
        # (With so few rows the planner would rather scan; forbid that to see them apply. With
        # real data it picks between them and the owner's b-tree indexes by selectivity.)
        cursor.execute("SET LOCAL enable_seqscan = off")
        for table, alias, column, index in [
            ("conversations_message", "m", "content", "conversations_message_search"),
            ("conversations_conversation", "c", "title", "conversations_conversation_search"),
        ]:
            expression = search.pg_vector(f"{alias}.{column}")
            assert f"{expression} @@ to_tsquery" in search.PostgreSQLSearch.HITS_SQL
            cursor.execute(
                f"EXPLAIN SELECT 1 FROM {table} {alias} "
                f"WHERE {expression} @@ to_tsquery('english'::regconfig, %s)",
                ["'zucchini':*"],
            )
            plan = " ".join(row[0] for row in cursor.fetchall())
            assert index in plan, plan


@on_postgresql
def test_postgresql_finds_words_in_tag_like_text(owner):
    # PostgreSQL's parser skips "<tags>" and <script> contents; the index swaps "<" out first.
    conversation = make_conversation(owner, texts=['<div class="card">', "<script>alert</script>"])

    assert found(owner, "div card") == [conversation.pk]
    assert found(owner, "alert") == [conversation.pk]
    snippet = str(search_conversations(owner=owner, query="alert")[0].snippet)
    assert "script>alert</script" in snippet  # ts_headline trims the punctuation at the ends


@pytest.mark.django_db(transaction=True)
def test_the_migration_is_reversible_and_fills_the_index(owner):
    conversation = make_conversation(owner, "Before the index", texts=["persimmon"])

    call_command("migrate", "conversations", "0002", verbosity=0)
    try:
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
        assert "conversations_search" not in tables
    finally:
        call_command("migrate", "conversations", verbosity=0)

    # Rows that existed before the index are indexed by the migration.
    assert found(owner, "persimmon") == [conversation.pk]
    assert found(owner, "before index") == [conversation.pk]
