"""The REST API contract: auth, conversations, messages, errors, ownership, docs, CORS."""

import json
import re
import uuid
from datetime import timedelta

import pytest
import yaml
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from conversations.models import Conversation, Message
from tests.conftest import PASSWORD
from tests.factories import (
    CONVERSATION_FIELDS,
    REPLY_STATS,
    assert_detail,
    detail_url,
    make_conversation,
    messages_url,
    snapshot,
)

pytestmark = pytest.mark.django_db

USER_MESSAGE_FIELDS = {"id", "role", "content", "status", "created_at"} | {
    "is_active",
    "version",
    "versions",
    "version_group",
}


# --- token ---------------------------------------------------------------------------------------


def test_token_for_valid_credentials_authenticates_requests(owner, anon_api):
    response = anon_api.post(
        "/api/token/", {"username": "owner", "password": PASSWORD}, format="json"
    )

    assert response.status_code == 200
    token = response.json()["token"]
    assert isinstance(token, str)
    assert token
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/conversations/").status_code == 200


def test_token_for_wrong_password_is_400_with_detail(owner, anon_api):
    response = anon_api.post(
        "/api/token/", {"username": "owner", "password": "not-the-password"}, format="json"
    )

    assert_detail(response, 400)
    assert "token" not in response.json()


def test_invalid_token_is_401(owner):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    assert_detail(client.get("/api/conversations/"), 401)


# --- conversations -------------------------------------------------------------------------------


def test_list_is_newest_first_paginated_and_counts_messages(api, owner, other_user):
    now = timezone.now()
    oldest = make_conversation(owner, "oldest", updated_at=now - timedelta(hours=3), messages=1)
    newest = make_conversation(owner, "newest", updated_at=now - timedelta(hours=1), messages=4)
    middle = make_conversation(owner, "middle", updated_at=now - timedelta(hours=2))
    make_conversation(other_user, "not yours", updated_at=now)

    response = api.get("/api/conversations/")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"count", "next", "previous", "results"}
    assert body["count"] == 3
    assert body["next"] is None
    assert body["previous"] is None
    assert [c["id"] for c in body["results"]] == [str(newest.pk), str(middle.pk), str(oldest.pk)]
    assert [c["message_count"] for c in body["results"]] == [4, 0, 1]
    assert set(body["results"][0]) == CONVERSATION_FIELDS


def test_list_pages(api, owner):
    now = timezone.now()
    for i in range(3):
        make_conversation(owner, f"chat {i}", updated_at=now - timedelta(minutes=i))

    first = api.get("/api/conversations/", {"page_size": 2}).json()
    assert first["count"] == 3
    assert [c["title"] for c in first["results"]] == ["chat 0", "chat 1"]
    assert first["previous"] is None
    assert first["next"]

    second = api.get(first["next"]).json()
    assert [c["title"] for c in second["results"]] == ["chat 2"]
    assert second["next"] is None
    assert second["previous"]


def test_posting_moves_a_conversation_to_the_top(api, owner, fake_engine):
    now = timezone.now()
    old = make_conversation(owner, "old", updated_at=now - timedelta(days=2))
    make_conversation(owner, "recent", updated_at=now - timedelta(days=1))

    assert api.post(messages_url(old), {"content": "hi"}, format="json").status_code == 201

    titles = [c["title"] for c in api.get("/api/conversations/").json()["results"]]
    assert titles == ["old", "recent"]


def assert_answered_and_stored(response, status, *, message_count, **fields) -> Conversation:
    """The conversation `response` gives has `fields` and `message_count`, and is stored with
    `fields`; returns it as stored."""
    assert response.status_code == status
    body = response.json()
    assert {name: body[name] for name in fields} == fields
    assert body["message_count"] == message_count
    conversation = Conversation.objects.get(pk=body["id"])
    assert {name: getattr(conversation, name) for name in fields} == fields
    return conversation


def test_create_with_title_and_system_prompt(api, owner):
    response = api.post(
        "/api/conversations/",
        {"title": "Trip plans", "system_prompt": "Answer like a pirate."},
        format="json",
    )

    conversation = assert_answered_and_stored(
        response, 201, message_count=0, title="Trip plans", system_prompt="Answer like a pirate."
    )
    assert conversation.owner == owner


@pytest.mark.parametrize("payload", [{}, {"system_prompt": None}], ids=["omitted", "null"])
def test_create_without_system_prompt_stores_the_default(api, settings, payload):
    settings.CHATBOT_SYSTEM_PROMPT = "You are a terse test assistant."

    response = api.post("/api/conversations/", payload, format="json")

    assert response.status_code == 201
    assert response.json()["system_prompt"] == "You are a terse test assistant."
    assert response.json()["title"] == ""
    conversation = Conversation.objects.get(pk=response.json()["id"])
    assert conversation.system_prompt == "You are a terse test assistant."


def test_create_with_an_empty_system_prompt_has_none(api, settings, fake_engine):
    settings.CHATBOT_SYSTEM_PROMPT = "You are a terse test assistant."

    response = api.post("/api/conversations/", {"system_prompt": ""}, format="json")

    assert response.status_code == 201
    assert response.json()["system_prompt"] == ""
    conversation = Conversation.objects.get(pk=response.json()["id"])
    assert conversation.system_prompt == ""
    api.post(messages_url(conversation), {"content": "Hi"}, format="json")
    assert fake_engine.calls[-1] == [{"role": "user", "content": "Hi"}]


def test_retrieve(api, owner):
    conversation = make_conversation(owner, "One", messages=3, system_prompt="Be kind.")

    response = api.get(detail_url(conversation))

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(conversation.pk)
    assert body["title"] == "One"
    assert body["system_prompt"] == "Be kind."
    assert body["message_count"] == 3


def test_patch_updates_title_and_system_prompt(api, owner):
    conversation = make_conversation(owner, "Before", messages=2, system_prompt="Old prompt.")

    response = api.patch(
        detail_url(conversation),
        {"title": "After", "system_prompt": "New prompt."},
        format="json",
    )

    assert_answered_and_stored(
        response, 200, message_count=2, title="After", system_prompt="New prompt."
    )


def test_patch_with_null_system_prompt_restores_the_default(api, owner, settings):
    conversation = make_conversation(owner, "Chat", system_prompt="Old prompt.")

    response = api.patch(detail_url(conversation), {"system_prompt": None}, format="json")

    assert response.status_code == 200
    assert response.json()["system_prompt"] == settings.CHATBOT_SYSTEM_PROMPT
    conversation.refresh_from_db()
    assert conversation.system_prompt == settings.CHATBOT_SYSTEM_PROMPT


def test_patch_with_an_empty_system_prompt_removes_it(api, owner, settings):
    conversation = make_conversation(owner, "Chat", system_prompt="Old prompt.")

    response = api.patch(detail_url(conversation), {"system_prompt": ""}, format="json")

    assert response.status_code == 200
    assert response.json()["system_prompt"] == ""
    conversation.refresh_from_db()
    assert conversation.system_prompt == ""


def test_patch_without_a_system_prompt_keeps_it(api, owner):
    conversation = make_conversation(owner, "Chat", system_prompt="Old prompt.")

    response = api.patch(detail_url(conversation), {"title": "Renamed"}, format="json")

    assert response.status_code == 200
    conversation.refresh_from_db()
    assert (conversation.title, conversation.system_prompt) == ("Renamed", "Old prompt.")


def test_patch_ignores_read_only_fields(api, owner, other_user):
    conversation = make_conversation(owner, "Mine")
    created_at = conversation.created_at

    response = api.patch(
        detail_url(conversation),
        {"id": str(uuid.uuid4()), "created_at": "2000-01-01T00:00:00Z", "owner": other_user.pk},
        format="json",
    )

    assert response.status_code == 200
    conversation.refresh_from_db()
    assert response.json()["id"] == str(conversation.pk)
    assert conversation.created_at == created_at
    assert conversation.owner == owner


def test_delete_removes_conversation_and_messages(api, owner):
    conversation = make_conversation(owner, "Doomed", messages=2)
    keep = make_conversation(owner, "Kept", messages=1)

    response = api.delete(detail_url(conversation))

    assert response.status_code == 204
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    assert keep.messages.count() == 1


def test_put_is_not_allowed(api, owner):
    conversation = make_conversation(owner, "Stays")

    response = api.put(detail_url(conversation), {"title": "Replaced"}, format="json")

    assert_detail(response, 405)
    conversation.refresh_from_db()
    assert conversation.title == "Stays"


# --- messages ------------------------------------------------------------------------------------


def test_messages_are_listed_oldest_first_and_paginated(api, owner):
    conversation = make_conversation(owner, "Thread")
    base = timezone.now()
    # Inserted out of order: the API sorts by created_at, not by insertion.
    for offset, content in [(2, "third"), (0, "first"), (1, "second")]:
        Message.objects.create(
            conversation=conversation,
            role=Message.Role.USER,
            content=content,
            created_at=base + timedelta(seconds=offset),
        )

    body = api.get(messages_url(conversation)).json()
    assert body["count"] == 3
    assert [m["content"] for m in body["results"]] == ["first", "second", "third"]

    page = api.get(messages_url(conversation), {"page_size": 2}).json()
    assert [m["content"] for m in page["results"]] == ["first", "second"]
    assert page["next"]
    assert [m["content"] for m in api.get(page["next"]).json()["results"]] == ["third"]


def test_post_message_stores_and_answers(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")

    response = api.post(messages_url(conversation), {"content": "Hello there"}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"conversation", "user_message", "reply"}
    assert body["conversation"] == str(conversation.pk)

    user_message = body["user_message"]
    assert set(user_message) == USER_MESSAGE_FIELDS
    assert user_message["role"] == "user"
    assert user_message["content"] == "Hello there"
    assert user_message["status"] == "ok"

    reply = body["reply"]
    assert set(reply) >= REPLY_STATS
    assert "error" not in reply
    assert reply["role"] == "assistant"
    assert reply["status"] == "ok"
    assert reply["content"] == "Echo: Hello there"
    assert reply["model"] == "fake-echo"
    assert reply["ttft_ms"] == 5
    assert reply["total_ms"] == 20
    assert reply["completion_tokens"] == 3
    assert reply["prompt_tokens"] > 0
    assert reply["context_turns"] == 0

    stored = list(conversation.messages.order_by("created_at"))
    assert [(m.role, m.content) for m in stored] == [
        ("user", "Hello there"),
        ("assistant", "Echo: Hello there"),
    ]
    assert str(stored[0].pk) == user_message["id"]
    assert str(stored[1].pk) == reply["id"]


def test_listed_messages_have_reply_fields_only_on_replies(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    api.post(messages_url(conversation), {"content": "Hi"}, format="json")

    user_message, reply = api.get(messages_url(conversation)).json()["results"]

    assert set(user_message) == USER_MESSAGE_FIELDS
    assert set(reply) >= REPLY_STATS
    assert reply["model"] == "fake-echo"


# --- /api/messages/ ------------------------------------------------------------------------------


def test_start_message_creates_a_conversation(api, owner, fake_engine, settings):
    settings.CHATBOT_SYSTEM_PROMPT = "Default prompt."

    response = api.post("/api/messages/", {"content": "Plan a picnic\nfor Sunday"}, format="json")

    assert response.status_code == 201
    body = response.json()
    conversation = Conversation.objects.get(pk=body["conversation"])
    assert conversation.owner == owner
    assert conversation.title == "Plan a picnic"
    assert conversation.system_prompt == "Default prompt."
    assert body["user_message"]["content"] == "Plan a picnic\nfor Sunday"
    assert body["reply"]["content"] == "Echo: Plan a picnic\nfor Sunday"
    assert conversation.messages.count() == 2


def test_start_message_with_null_conversation_creates_one(api, owner, fake_engine):
    response = api.post("/api/messages/", {"content": "Hi", "conversation": None}, format="json")

    assert response.status_code == 201
    assert Conversation.objects.filter(owner=owner).count() == 1


def test_start_message_with_conversation_posts_into_it(api, owner, fake_engine):
    conversation = make_conversation(owner, "Existing")
    api.post(messages_url(conversation), {"content": "first"}, format="json")

    response = api.post(
        "/api/messages/", {"content": "second", "conversation": str(conversation.pk)}, format="json"
    )

    assert response.status_code == 201
    assert response.json()["conversation"] == str(conversation.pk)
    assert response.json()["reply"]["context_turns"] == 2
    assert Conversation.objects.count() == 1
    assert conversation.messages.count() == 4
    conversation.refresh_from_db()
    assert conversation.title == "Existing"


def test_start_message_into_another_users_conversation_is_404(api, other_user, fake_engine, owner):
    theirs = make_conversation(other_user, "Private", messages=2)
    before = snapshot(theirs)
    conversations = Conversation.objects.count()
    messages = Message.objects.count()

    response = api.post(
        "/api/messages/", {"content": "sneaky", "conversation": str(theirs.pk)}, format="json"
    )

    assert_detail(response, 404)
    assert Conversation.objects.count() == conversations
    assert Message.objects.count() == messages
    assert snapshot(theirs) == before
    assert fake_engine.calls == []


def test_start_message_into_a_missing_conversation_is_404(api, owner, fake_engine):
    response = api.post(
        "/api/messages/", {"content": "hi", "conversation": str(uuid.uuid4())}, format="json"
    )

    assert_detail(response, 404)
    assert Message.objects.count() == 0
    assert Conversation.objects.count() == 0


# --- ownership and authentication ----------------------------------------------------------------

ID_ENDPOINTS = [
    ("get", "detail", None),
    ("patch", "detail", {"title": "Hijacked", "system_prompt": "Obey me."}),
    ("delete", "detail", None),
    ("get", "messages", None),
    ("post", "messages", {"content": "Hijack"}),
    ("post", "start", {"content": "Hijack"}),
]


def endpoint_url(kind: str, conversation) -> str:
    return {
        "detail": detail_url(conversation),
        "messages": messages_url(conversation),
        "start": "/api/messages/",
    }[kind]


def endpoint_body(kind: str, body, conversation):
    if kind == "start":
        return {**body, "conversation": str(conversation.pk)}
    return body


@pytest.mark.parametrize(("method", "kind", "body"), ID_ENDPOINTS)
def test_other_users_get_404_and_change_nothing(other_api, owner, fake_engine, method, kind, body):
    conversation = make_conversation(owner, "Owner's", messages=2, system_prompt="Secret.")
    before = snapshot(conversation)
    total_messages = Message.objects.count()

    response = getattr(other_api, method)(
        endpoint_url(kind, conversation),
        endpoint_body(kind, body, conversation),
        format="json",
    )

    assert_detail(response, 404)
    assert "Secret." not in response.content.decode()
    assert snapshot(conversation) == before
    assert Message.objects.count() == total_messages
    assert Conversation.objects.count() == 1
    assert fake_engine.calls == []


def test_other_users_list_does_not_show_the_conversation(other_api, owner):
    make_conversation(owner, "Owner's")

    body = other_api.get("/api/conversations/").json()

    assert body["count"] == 0
    assert body["results"] == []


ALL_ENDPOINTS = [
    ("get", "list", None),
    ("post", "list", {"title": "x"}),
    *ID_ENDPOINTS,
    ("post", "start-new", {"content": "Hi"}),
]


@pytest.mark.parametrize(("method", "kind", "body"), ALL_ENDPOINTS)
def test_no_credentials_is_401_everywhere(anon_api, owner, fake_engine, method, kind, body):
    conversation = make_conversation(owner, "Owner's", messages=2)
    before = snapshot(conversation)
    if kind == "list":
        url = "/api/conversations/"
    elif kind == "start-new":
        url = "/api/messages/"
    else:
        url = endpoint_url(kind, conversation)
        body = endpoint_body(kind, body, conversation) if body else body

    response = getattr(anon_api, method)(url, body, format="json")

    assert_detail(response, 401)
    assert response["WWW-Authenticate"].startswith("Token")
    assert snapshot(conversation) == before
    assert Conversation.objects.count() == 1
    assert fake_engine.calls == []


def test_session_auth_requires_csrf(owner, fake_engine):
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="owner", password=PASSWORD)

    assert client.get("/api/conversations/").status_code == 200
    refused = client.post("/api/conversations/", {"title": "No token"}, format="json")
    assert "CSRF" in assert_detail(refused, 403)
    assert Conversation.objects.count() == 0

    # With the token from the cookie (as the pages' JavaScript sends it) the same request works.
    client.get("/")
    token = client.cookies["csrftoken"].value
    accepted = client.post(
        "/api/conversations/", {"title": "With token"}, format="json", HTTP_X_CSRFTOKEN=token
    )
    assert accepted.status_code == 201
    assert Conversation.objects.get().title == "With token"


# --- validation ----------------------------------------------------------------------------------

INVALID_CONTENT = [
    pytest.param({}, id="missing"),
    pytest.param({"content": 42}, id="number"),
    pytest.param({"content": ["hi"]}, id="list"),
    pytest.param({"content": {"text": "hi"}}, id="object"),
    pytest.param({"content": None}, id="null"),
    pytest.param({"content": True}, id="boolean"),
    pytest.param({"content": ""}, id="empty"),
    pytest.param({"content": "   \n\t "}, id="whitespace"),
    pytest.param({"content": "bad\x00byte"}, id="nul"),
]


def assert_nothing_stored(before_messages, before_conversations, fake_engine):
    assert Message.objects.count() == before_messages
    assert Conversation.objects.count() == before_conversations
    assert fake_engine.calls == []


@pytest.mark.parametrize("payload", INVALID_CONTENT)
def test_invalid_content_is_400_and_stores_nothing(api, fake_engine, post_url, payload):
    messages, conversations = Message.objects.count(), Conversation.objects.count()

    response = api.post(post_url, payload, format="json")

    detail = assert_detail(response, 400)
    assert "content" in detail.lower()
    assert_nothing_stored(messages, conversations, fake_engine)


def test_content_over_the_limit_is_400_naming_the_limit(api, fake_engine, post_url, settings):
    settings.CHATBOT_MAX_MESSAGE_CHARS = 50
    messages, conversations = Message.objects.count(), Conversation.objects.count()

    response = api.post(post_url, {"content": "x" * 51}, format="json")

    detail = assert_detail(response, 400)
    assert "50" in detail
    assert "51" in detail
    assert_nothing_stored(messages, conversations, fake_engine)


def test_content_at_the_limit_is_accepted(api, fake_engine, post_url, settings):
    settings.CHATBOT_MAX_MESSAGE_CHARS = 50

    response = api.post(post_url, {"content": "x" * 50}, format="json")

    assert response.status_code == 201
    assert response.json()["user_message"]["content"] == "x" * 50


def test_surrounding_whitespace_is_kept(api, fake_engine, post_url):
    response = api.post(post_url, {"content": "  indented\n"}, format="json")

    assert response.status_code == 201
    assert response.json()["user_message"]["content"] == "  indented\n"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"content": "unterminated', id="invalid-json"),
        pytest.param('["hello"]', id="array"),
        pytest.param('"hello"', id="string"),
    ],
)
def test_malformed_body_is_400_and_stores_nothing(api, fake_engine, post_url, raw):
    messages, conversations = Message.objects.count(), Conversation.objects.count()

    response = api.post(post_url, raw, content_type="application/json")

    assert_detail(response, 400)
    assert_nothing_stored(messages, conversations, fake_engine)


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("get", "", None),
        ("patch", "", {"title": "x"}),
        ("delete", "", None),
        ("get", "messages/", None),
        ("post", "messages/", {"content": "hi"}),
    ],
)
def test_malformed_conversation_id_in_url_is_404(api, owner, fake_engine, method, suffix, body):
    make_conversation(owner, "Chat")

    response = getattr(api, method)(f"/api/conversations/not-a-uuid/{suffix}", body, format="json")

    assert_detail(response, 404)
    assert_nothing_stored(0, 1, fake_engine)


@pytest.mark.parametrize("conversation", ["not-a-uuid", "", ["x"]])
def test_malformed_conversation_id_in_body_is_400(api, owner, fake_engine, conversation):
    response = api.post(
        "/api/messages/", {"content": "hi", "conversation": conversation}, format="json"
    )

    detail = assert_detail(response, 400)
    assert "conversation" in detail
    assert_nothing_stored(0, 0, fake_engine)


def test_validation_errors_also_list_fields(api, fake_engine):
    body = api.post("/api/messages/", {}, format="json").json()

    assert body["errors"]["content"]
    assert body["detail"].startswith("content:")


# --- generation failures -------------------------------------------------------------------------


def test_generation_failure_is_503_and_keeps_the_exchange(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    fake_engine.fail_with = RuntimeError("boom")

    response = api.post(messages_url(conversation), {"content": "Hello?"}, format="json")

    detail = assert_detail(response, 503)
    assert "boom" in detail
    body = response.json()
    assert body["conversation"] == str(conversation.pk)
    assert body["user_message"]["content"] == "Hello?"
    assert body["reply"]["status"] == "error"
    assert "boom" in body["reply"]["error"]

    user_message = Message.objects.get(pk=body["user_message"]["id"])
    assert user_message.role == "user"
    assert user_message.content == "Hello?"
    assert user_message.status == "ok"
    reply = Message.objects.get(pk=body["reply"]["id"])
    assert reply.conversation == conversation
    assert reply.role == "assistant"
    assert reply.status == "error"
    assert "boom" in reply.error
    assert reply.content == ""

    # The next message works, and the model is not shown the failed reply.
    fake_engine.fail_with = None
    fake_engine.calls.clear()
    retry = api.post(messages_url(conversation), {"content": "Again"}, format="json")

    assert retry.status_code == 201
    assert retry.json()["reply"]["status"] == "ok"
    (sent,) = fake_engine.calls
    assert sent == [
        {"role": "system", "content": conversation.system_prompt},
        {"role": "user", "content": "Hello?"},
        {"role": "user", "content": "Again"},
    ]
    assert retry.json()["reply"]["context_turns"] == 1


def test_failed_reply_is_listed_with_its_error(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    fake_engine.fail_with = RuntimeError("boom")
    api.post(messages_url(conversation), {"content": "Hello?"}, format="json")

    user_message, reply = api.get(messages_url(conversation)).json()["results"]

    assert "error" not in user_message
    assert reply["status"] == "error"
    assert "boom" in reply["error"]


def test_generation_failure_when_starting_keeps_the_new_conversation(api, owner, fake_engine):
    fake_engine.fail_with = RuntimeError("boom")

    response = api.post("/api/messages/", {"content": "First words"}, format="json")

    assert "boom" in assert_detail(response, 503)
    conversation = Conversation.objects.get(pk=response.json()["conversation"])
    assert conversation.owner == owner
    assert conversation.title == "First words"
    assert [(m.role, m.status) for m in conversation.messages.order_by("created_at")] == [
        ("user", "ok"),
        ("assistant", "error"),
    ]


# --- query counts --------------------------------------------------------------------------------


def count_queries(client, url) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries)


def test_listing_conversations_takes_constant_queries(api, owner):
    for i in range(3):
        make_conversation(owner, f"chat {i}", messages=2)
    few = count_queries(api, "/api/conversations/")

    for i in range(27):
        make_conversation(owner, f"more {i}", messages=2)
    many = count_queries(api, "/api/conversations/")

    assert api.get("/api/conversations/").json()["count"] == 30
    assert len(api.get("/api/conversations/").json()["results"]) == 30
    assert many == few


def test_listing_messages_takes_constant_queries(api, owner):
    short = make_conversation(owner, "short", messages=5)
    long = make_conversation(owner, "long", messages=50)

    few = count_queries(api, messages_url(short))
    many = count_queries(api, messages_url(long))

    assert len(api.get(messages_url(long)).json()["results"]) == 50
    assert many == few


def test_posting_a_message_takes_constant_queries(api, owner, fake_engine):
    """Whatever the history, a message and its reply cost the same few queries (25: token, the
    rate limit's count in the database (read, then written in a transaction: six statements in
    a test's transaction), the conversation, the storage limit's sums, the user's token quota
    (unlimited: no sum of today's tokens), the user's replies in flight, the message
    transaction, the history, a save of the first text, the finished reply,
    and the reply's versions for the answer), and two more where the database has row locks
    (PostgreSQL): the conversation's row and the owner's, locked while the message is
    admitted."""

    def post(conversation):
        with CaptureQueriesContext(connection) as queries:
            response = api.post(messages_url(conversation), {"content": "Hi"}, format="json")
        assert response.status_code == 201 and response.json()["reply"]["status"] == "ok"
        return len(queries)

    few, many = (
        post(make_conversation(owner, messages=2)),
        post(make_conversation(owner, messages=60)),
    )
    row_locks = 2 if connection.features.has_select_for_update else 0
    assert few == many <= 25 + row_locks


# --- schema and docs -----------------------------------------------------------------------------


def test_schema_lists_the_endpoints(api):
    response = api.get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/api/conversations/",
        "/api/conversations/{id}/",
        "/api/conversations/{id}/messages/",
        "/api/messages/",
        "/api/token/",
    ):
        assert path in paths
    assert "put" not in paths["/api/conversations/{id}/"]
    assert "post" in paths["/api/conversations/{id}/messages/"]


def test_schema_generates_without_warnings_and_validates(tmp_path):
    # drf-spectacular warns when it has to guess (a parameter type, a serializer); fail on that.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml"))
    schema = (tmp_path / "s.yml").read_text()
    assert "format: uuid" in schema
    assert "ExchangeResponse" in schema or "Exchange" in schema


def test_docs_are_served_without_external_hosts(api):
    response = api.get("/api/docs/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "swagger" in html.lower()
    assert "/static/drf_spectacular_sidecar/" in html
    assert "cdn" not in html.lower()
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    for asset in assets:  # our static files, and the init script from the docs' own URL
        assert asset.startswith(("/static/", "/api/docs/?")), asset
    assert "https://" not in html


def test_schema_validates_and_lists_the_new_actions(tmp_path):
    path = tmp_path / "schema.yml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))

    paths = yaml.safe_load(path.read_text())["paths"]
    for action in ("stop", "regenerate", "edit", "activate"):
        assert "post" in paths[f"/api/conversations/{{id}}/{action}/"], action
    messages = paths["/api/conversations/{id}/messages/"]
    assert {"get", "post"} <= set(messages)
    assert any(p["name"] == "include" for p in messages["get"].get("parameters", []))


# --- CORS ----------------------------------------------------------------------------------------


def test_cors_allows_configured_origins_only(api, settings):
    settings.CORS_ALLOWED_ORIGINS = ["http://example.test"]

    allowed = api.get("/api/conversations/", HTTP_ORIGIN="http://example.test")
    other = api.get("/api/conversations/", HTTP_ORIGIN="http://evil.test")

    assert allowed["Access-Control-Allow-Origin"] == "http://example.test"
    assert "Access-Control-Allow-Origin" not in other


def test_cors_preflight_allows_the_authorization_header(anon_api, settings):
    settings.CORS_ALLOWED_ORIGINS = ["http://example.test"]

    response = anon_api.options(
        "/api/messages/",
        HTTP_ORIGIN="http://example.test",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization, content-type",
    )

    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == "http://example.test"
    assert "authorization" in response["Access-Control-Allow-Headers"].lower()
    assert "POST" in response["Access-Control-Allow-Methods"]


def test_cors_allows_nothing_by_default(api, settings):
    settings.CORS_ALLOWED_ORIGINS = []

    response = api.get("/api/conversations/", HTTP_ORIGIN="http://example.test")

    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response
