"""Bad requests to the API: each gets the right status and a JSON `detail` a person can read,
and changes nothing (no message, no conversation, no call to the model)."""

import json
import re
import uuid

import pytest

from conversations.models import Conversation, Message
from tests.factories import assert_detail, make_conversation, messages_url

pytestmark = pytest.mark.django_db


@pytest.fixture
def unchanged(fake_engine):
    """Asserts, after the test's request, that nothing was stored and the model was not asked."""
    before = (Message.objects.count(), Conversation.objects.count())
    yield
    assert (Message.objects.count(), Conversation.objects.count()) == before
    assert fake_engine.calls == []


BODIES = [
    pytest.param(b'{"content": "hi"', "application/json", 400, "JSON", id="invalid-json"),
    pytest.param(b'["hi"]', "application/json", 400, "object", id="json-array"),
    pytest.param(b'"hi"', "application/json", 400, "object", id="json-string"),
    pytest.param(b"42", "application/json", 400, "object", id="json-number"),
    pytest.param(b"null", "application/json", 400, "no data", id="json-null"),
    pytest.param(b"", "application/json", 400, "content", id="empty-body"),
    pytest.param(b"content=hi", "text/plain", 415, "text/plain", id="text-plain"),
    pytest.param(b"<content>hi</content>", "application/xml", 415, "xml", id="xml"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "said"), BODIES)
def test_malformed_bodies_are_refused(api, post_url, unchanged, body, content_type, status, said):
    response = api.generic("POST", post_url, body, content_type=content_type)

    assert said.lower() in assert_detail(response, status).lower()


def test_an_oversized_body_is_413_naming_the_limit(api, post_url, unchanged, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100_000
    body = json.dumps({"content": "x" * 150_000}).encode()

    response = api.generic("POST", post_url, body, content_type="application/json")

    detail = assert_detail(response, 413)
    assert "100000" in detail.replace(",", "")


UNKNOWN = str(uuid.uuid4())
MALFORMED = "not-a-uuid"


@pytest.mark.parametrize("conversation", [UNKNOWN, MALFORMED, "1", "%00"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/conversations/{}/"),
        ("patch", "/api/conversations/{}/"),
        ("delete", "/api/conversations/{}/"),
        ("get", "/api/conversations/{}/messages/"),
        ("post", "/api/conversations/{}/messages/"),
        ("post", "/api/conversations/{}/stop/"),
        ("post", "/api/conversations/{}/regenerate/"),
        ("get", "/api/conversations/{}/export/"),
    ],
)
def test_unknown_or_malformed_conversation_ids_are_404(api, unchanged, method, path, conversation):
    response = getattr(api, method)(path.format(conversation), {"content": "hi"}, format="json")

    detail = assert_detail(response, 404).lower()
    assert "not found" in detail or "no conversation" in detail


@pytest.fixture
def conversation(owner):
    return make_conversation(owner, "Chat")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/api/messages/"),
        ("get", "/api/messages/"),
        ("delete", "/api/conversations/{}/messages/"),
        ("put", "/api/conversations/{}/messages/"),
        ("get", "/api/conversations/{}/stop/"),
        ("get", "/api/conversations/{}/regenerate/"),
        ("post", "/api/conversations/{}/"),
    ],
)
def test_wrong_methods_are_405(api, conversation, unchanged, method, path):
    response = getattr(api, method)(path.format(conversation.pk), {"content": "hi"}, format="json")

    assert method.upper() in assert_detail(response, 405)
    assert "Allow" in response.headers


def test_an_unknown_api_path_is_a_json_404(api, unchanged):
    assert "not found" in assert_detail(api.get("/api/no-such-thing/"), 404).lower()


def test_an_unknown_page_is_still_an_html_404(client):
    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


# --- bodies the JSON parser cannot take, and text that cannot be stored ---------------------------


DEEP = b"[" * 50_000


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/token/"),
        ("post", "/api/messages/"),
        ("post", "/api/conversations/"),
        ("post", "/api/conversations/{}/messages/"),
        ("patch", "/api/conversations/{}/"),
        ("post", "/api/conversations/import/"),
    ],
)
def test_a_deeply_nested_body_is_400_without_a_traceback(
    api, conversation, unchanged, caplog, method, path
):
    caplog.set_level("WARNING")

    response = api.generic(
        method.upper(), path.format(conversation.pk), DEEP, content_type="application/json"
    )

    assert "nested" in assert_detail(response, 400)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_a_deeply_nested_body_to_the_token_endpoint_needs_no_login(anon_api, unchanged):
    response = anon_api.generic("POST", "/api/token/", DEEP, content_type="application/json")

    assert "nested" in assert_detail(response, 400)


# A JSON escape of half a UTF-16 pair: valid JSON, but no character, so no database stores it.
LONE_SURROGATE = '"x\\ud800y"'


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/messages/", '{"content": %s}'),
        ("post", "/api/conversations/{}/messages/", '{"content": %s}'),
        ("post", "/api/conversations/{}/edit/", '{"content": %s}'),
        ("post", "/api/conversations/", '{"title": %s}'),
        ("post", "/api/conversations/", '{"system_prompt": %s}'),
        ("patch", "/api/conversations/{}/", '{"title": %s}'),
        ("patch", "/api/conversations/{}/", '{"system_prompt": %s}'),
        ("post", "/api/token/", '{"username": %s, "password": "x"}'),
    ],
)
def test_a_lone_surrogate_in_a_json_body_is_400(api, conversation, unchanged, method, path, body):
    response = api.generic(
        method.upper(),
        path.format(conversation.pk),
        (body % LONE_SURROGATE).encode(),
        content_type="application/json",
    )

    assert "surrogate" in assert_detail(response, 400)
    conversation.refresh_from_db()
    assert conversation.title == "Chat"


# --- titles and terminal output without control characters or bidi overrides --------------------

# A line break, a terminal escape (clear the screen, red text) and a right-to-left override.
HOSTILE_TITLE = "Plans\r\nfor\tMay\x1b[2J\x1b[31m red\u202egnp.exe\u2066x\x7f\x85"
CLEAN_TITLE = "Plans for May[2J[31m redgnp.exex"
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def test_titles_lose_control_and_bidi_characters_when_created(api, fake_engine):
    response = api.post("/api/conversations/", {"title": HOSTILE_TITLE}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["title"] == CLEAN_TITLE
    assert Conversation.objects.get().title == CLEAN_TITLE


def test_titles_lose_control_and_bidi_characters_when_renamed(api, conversation):
    response = api.patch(f"/api/conversations/{conversation.pk}/", {"title": HOSTILE_TITLE})

    assert response.status_code == 200, response.content
    assert response.json()["title"] == CLEAN_TITLE
    conversation.refresh_from_db()
    assert conversation.title == CLEAN_TITLE


def test_a_title_from_the_first_message_is_clean(api, fake_engine):
    response = api.post("/api/messages/", {"content": "\u202eevil\x1b[0m title\nrest"})

    assert response.status_code == 201, response.content
    assert Conversation.objects.get().title == "evil[0m title"


def test_a_title_the_model_writes_is_clean(api, fake_engine, settings):
    settings.CHATBOT_AUTO_TITLE = True
    fake_engine.replies = ["Hello!", "Trip\x1b[5m to \u202eRome"]

    response = api.post("/api/messages/", {"content": "Plan a trip"})

    assert response.status_code == 201, response.content
    assert Conversation.objects.get().title == "Trip[5m to Rome"


def test_the_terminal_chat_prints_no_control_or_bidi_characters(
    owner, fake_engine, monkeypatch, capsys
):
    import io
    import sys

    from django.core.management import call_command

    chat = make_conversation(owner, "Chat")
    Message.objects.create(conversation=chat, role="user", content="look\x1b[2J\u202eaway\nok")
    Message.objects.create(conversation=chat, role="assistant", content="\x1b]0;pwned\x07fine")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\x1b[31mred\u202e\n"))
    out = io.StringIO()

    call_command("chat", "--conversation", str(chat.pk), stdout=out)

    printed = out.getvalue()
    assert "you> look[2Jaway\nok" in printed
    assert "bot> ]0;pwnedfine" in printed
    assert "bot> Echo: [31mred" in printed  # the reply echoes the stored message, cleaned
    assert not UNSAFE.search(printed)


# --- storage: conversations created or imported per minute, and per-user caps --------------------

IMPORT = "/api/conversations/import/"


def _export_document(title="Imported", content="hello") -> dict:
    return {
        "format": "local-chat.conversation",
        "version": 1,
        "conversation": {"title": title, "system_prompt": ""},
        "messages": [
            {"id": "a", "role": "user", "content": content, "created_at": "2026-01-01T10:00:00Z"}
        ],
    }


def test_creating_and_importing_conversations_is_rate_limited(api, other_api, settings):
    settings.CHATBOT_CONVERSATIONS_PER_MINUTE = 2
    assert api.post("/api/conversations/", {"title": "one"}, format="json").status_code == 201
    assert api.post(IMPORT, _export_document(), format="json").status_code == 201
    before = Conversation.objects.count(), Message.objects.count()

    for refused in (
        api.post("/api/conversations/", {"title": "three"}, format="json"),
        api.post(IMPORT, _export_document(), format="json"),
    ):
        assert "throttled" in assert_detail(refused, 429).lower()
        assert 1 <= int(refused["Retry-After"]) <= 60
    assert (Conversation.objects.count(), Message.objects.count()) == before
    # Reading is not limited, and another user has a budget of their own.
    assert api.get("/api/conversations/").status_code == 200
    assert other_api.post(IMPORT, _export_document(), format="json").status_code == 201


def test_importing_from_the_page_is_rate_limited(client, owner, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.CHATBOT_CONVERSATIONS_PER_MINUTE = 1
    client.force_login(owner)

    def upload():
        body = json.dumps(_export_document()).encode()
        return {"file": SimpleUploadedFile("chat.json", body, content_type="application/json")}

    assert client.post("/import/", upload()).status_code == 302
    refused = client.post("/import/", upload())

    assert refused.status_code == 429
    assert "Retry-After" in refused
    assert Conversation.objects.count() == 1


def test_a_user_has_a_cap_on_conversations(api, owner, other_api, fake_engine, settings):
    settings.CHATBOT_MAX_CONVERSATIONS = 2
    make_conversation(owner, "one")
    make_conversation(owner, "two")
    before = Conversation.objects.count(), Message.objects.count()

    for refused in (
        api.post("/api/conversations/", {"title": "three"}, format="json"),
        api.post(IMPORT, _export_document(), format="json"),
        api.post("/api/messages/", {"content": "a new chat"}, format="json"),
    ):
        detail = assert_detail(refused, 409)
        assert "2 conversations" in detail and "delete" in detail.lower()
    assert (Conversation.objects.count(), Message.objects.count()) == before
    assert fake_engine.calls == []
    assert other_api.post("/api/conversations/", {}, format="json").status_code == 201


def test_a_new_chat_from_the_page_past_the_cap_explains(client, owner, fake_engine, settings):
    settings.CHATBOT_MAX_CONVERSATIONS = 1
    make_conversation(owner, "one")
    client.force_login(owner)

    response = client.post("/new/", {"content": "hello", "system_prompt": ""}, follow=True)

    assert response.status_code == 200
    assert "1 conversations" in response.content.decode()
    assert Conversation.objects.count() == 1


def test_a_user_has_a_cap_on_stored_text(api, owner, fake_engine, settings):
    settings.CHATBOT_MAX_STORED_BYTES = 600
    chat = make_conversation(owner, "Chat")
    first = api.post(messages_url(chat), {"content": "é" * 100}, format="json")  # 200 bytes
    assert first.status_code == 201, first.content  # (and its echoed reply: 206 more)
    before = Conversation.objects.count(), Message.objects.count()

    for refused in (
        api.post(messages_url(chat), {"content": "x" * 300}, format="json"),
        api.post(IMPORT, _export_document(content="y" * 300), format="json"),
    ):
        detail = assert_detail(refused, 413)
        assert "600 bytes" in detail
    assert (Conversation.objects.count(), Message.objects.count()) == before
    # What fits is still taken.
    assert api.post(messages_url(chat), {"content": "ok"}, format="json").status_code == 201


# One value past each limit of a conversation, and the field it is given in.
PAST_THE_LIMITS = [
    pytest.param("system_prompt", "p" * (Conversation.MAX_SYSTEM_PROMPT_CHARS + 1), id="prompt"),
    pytest.param("temperature", Conversation.TEMPERATURE_RANGE[1] + 0.5, id="temperature-high"),
    pytest.param("temperature", Conversation.TEMPERATURE_RANGE[0] - 0.5, id="temperature-low"),
    pytest.param("max_new_tokens", Conversation.MAX_NEW_TOKENS_RANGE[0] - 1, id="budget-low"),
]


@pytest.mark.parametrize(("field", "value"), PAST_THE_LIMITS)
def test_every_door_holds_a_conversations_limits(
    api, client, owner, conversation, unchanged, field, value
):
    """Creating or changing a conversation on the API or the pages, and importing one: each
    refuses what the model's limits refuse, and stores nothing."""
    client.force_login(owner)
    before = Conversation.objects.values().get(pk=conversation.pk)
    document = _export_document()
    document["conversation"][field] = value
    settings_form = {"title": "Chat", "system_prompt": "", "temperature": "", "max_new_tokens": ""}

    refusals = [
        api.post("/api/conversations/", {field: value}, format="json"),
        api.patch(f"/api/conversations/{conversation.pk}/", {field: value}, format="json"),
        api.post(IMPORT, document, format="json"),
        client.post(f"/c/{conversation.pk}/settings/", {**settings_form, field: value}),
    ]
    if field == "system_prompt":
        refusals.append(client.post("/new/", {"content": "hi", field: value}))

    assert [response.status_code for response in refusals] == [400] * len(refusals)
    assert Conversation.objects.values().get(pk=conversation.pk) == before


def test_a_conversations_limits_are_reached_and_kept(api, client, owner, conversation):
    """The limits themselves are accepted, on the API, the pages and in an import."""
    client.force_login(owner)
    prompt = "p" * Conversation.MAX_SYSTEM_PROMPT_CHARS
    temperature = Conversation.TEMPERATURE_RANGE[1]
    budget = Conversation.MAX_NEW_TOKENS_RANGE[0]
    document = _export_document()
    document["conversation"].update(
        system_prompt=prompt, temperature=temperature, max_new_tokens=budget
    )
    fields = {"system_prompt": prompt, "temperature": temperature, "max_new_tokens": budget}

    created = api.post("/api/conversations/", fields, format="json")
    patched = api.patch(f"/api/conversations/{conversation.pk}/", fields, format="json")
    imported = api.post(IMPORT, document, format="json")
    saved = client.post(f"/c/{conversation.pk}/settings/", {"title": "Chat", **fields})

    assert [r.status_code for r in (created, patched, imported, saved)] == [201, 200, 201, 302]
    for pk in (created.json()["id"], conversation.pk, imported.json()["id"]):
        stored = Conversation.objects.get(pk=pk)
        assert (stored.system_prompt, stored.temperature, stored.max_new_tokens) == (
            prompt,
            temperature,
            budget,
        )
