"""Export (JSON and Markdown) and import of conversations: the domain, the API and the pages."""

import copy
import json
import re
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.utils import timezone

from conversations import exports, imports, services
from conversations.models import Conversation, Message

pytestmark = pytest.mark.django_db

SAFE_ATTACHMENT = re.compile(r'^attachment; filename="[A-Za-z0-9][A-Za-z0-9._-]*"$')
IMPORT_URL = "/api/conversations/import/"


# --- helpers -------------------------------------------------------------------------------------


def api_export_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/export/"


def page_export_url(conversation) -> str:
    return f"/c/{conversation.pk}/export/"


def make_versioned_conversation(user, title="Trip: Rome & Paris / 2026"):
    """Two turns with versions:

    Q1 -> R1a (regenerated away, inactive), R1b (active)
    Q2a (edited away, inactive) -> R2a (active, but off the path since Q2a is not)
    Q2b (active) -> R2b (active, failed)
    """
    conversation = services.create_conversation(
        owner=user, title=title, system_prompt="Answer like a travel agent."
    )
    start = timezone.now() - timedelta(hours=1)

    def add(offset, role, content, **fields):
        return Message.objects.create(
            conversation=conversation,
            role=role,
            content=content,
            created_at=start + timedelta(seconds=offset),
            **fields,
        )

    q1 = add(0, "user", "Where should I eat in Rome?")
    r1a = add(1, "assistant", "OLD ANSWER about Rome", reply_to=q1, is_active=False)
    r1b = add(
        2,
        "assistant",
        "Try **Trastevere**.\n\n<b>not escaped</b>",
        reply_to=q1,
        version_group=r1a.version_group,
        model="fake-echo",
        prompt_tokens=12,
        completion_tokens=5,
        ttft_ms=5,
        total_ms=20,
        context_turns=1,
        generation_params={"temperature": 0.0, "finish_reason": "stop"},
    )
    q2a = add(3, "user", "ORIGINAL second question", is_active=False)
    add(4, "assistant", "ANSWER TO THE ORIGINAL", reply_to=q2a)
    q2b = add(5, "user", "And in Paris?", version_group=q2a.version_group)
    add(6, "assistant", "", reply_to=q2b, status="error", error="RuntimeError: the model fell over")
    return conversation, {"q1": q1, "r1a": r1a, "r1b": r1b, "q2a": q2a, "q2b": q2b}


def shape(conversation) -> list[tuple]:
    """Everything an import must keep, with ids replaced by positions."""
    messages = list(Message.objects.filter(conversation=conversation).order_by("created_at"))
    position = {message.pk: index for index, message in enumerate(messages)}
    groups: dict = {}
    return [
        (
            message.role,
            message.content,
            message.status,
            message.error,
            message.is_active,
            message.created_at,
            position.get(message.reply_to_id),
            groups.setdefault(message.version_group, len(groups)),
            message.model,
            message.prompt_tokens,
            message.completion_tokens,
            message.ttft_ms,
            message.total_ms,
            message.context_turns,
            message.generation_params,
        )
        for message in messages
    ]


def counts() -> tuple[int, int]:
    return Conversation.objects.count(), Message.objects.count()


def minimal_document(**changes) -> dict:
    document = {
        "format": exports.FORMAT,
        "version": exports.VERSION,
        "conversation": {"title": "Hand-made", "system_prompt": ""},
        "messages": [
            {
                "id": "a",
                "role": "user",
                "content": "hello",
                "created_at": "2026-01-01T10:00:00Z",
            },
            {
                "id": "b",
                "role": "assistant",
                "content": "hi",
                "created_at": "2026-01-01T10:00:01Z",
                "reply_to": "a",
            },
        ],
    }
    document.update(changes)
    return document


def with_message(index: int, **changes) -> dict:
    document = minimal_document()
    document["messages"][index].update(changes)
    return document


def upload(content: bytes, name="chat.json") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/json")


# --- export: the JSON document -------------------------------------------------------------------


def test_json_export_keeps_every_version_oldest_first(owner):
    conversation, _ = make_versioned_conversation(owner)

    document = exports.export_conversation(conversation)

    assert document["format"] == "local-chat.conversation"
    assert document["version"] == 1
    assert document["exported_at"]
    assert document["conversation"]["title"] == "Trip: Rome & Paris / 2026"
    assert document["conversation"]["system_prompt"] == "Answer like a travel agent."
    assert set(document["conversation"]) >= {"temperature", "max_new_tokens", "created_at"}
    messages = document["messages"]
    assert len(messages) == 7
    assert [m["created_at"] for m in messages] == sorted(m["created_at"] for m in messages)
    ids = {m["id"] for m in messages}
    assert all(m["reply_to"] in ids for m in messages if m["reply_to"])
    assert [m["is_active"] for m in messages] == [True, False, True, False, True, True, True]
    assert messages[1]["version_group"] == messages[2]["version_group"]
    assert messages[3]["version_group"] == messages[5]["version_group"]
    assert messages[2]["generation_params"] == {"temperature": 0.0, "finish_reason": "stop"}
    assert messages[6]["status"] == "error"
    json.dumps(document)  # JSON-ready as it is


# --- export: the Markdown transcript -------------------------------------------------------------


def test_markdown_export_is_the_active_path_as_a_transcript(owner):
    conversation, _ = make_versioned_conversation(owner)

    text = exports.export_markdown(conversation)

    assert text.startswith("# Trip: Rome & Paris / 2026\n")
    assert "## System prompt\n\nAnswer like a travel agent.\n" in text
    turns = [
        "**You**",
        "Where should I eat in Rome?",
        "**Assistant**",
        "Try **Trastevere**.\n\n<b>not escaped</b>",  # as-is: a download, never rendered
        "**You**",
        "And in Paris?",
        "**Assistant**",
        "generation failed:** RuntimeError: the model fell over",
    ]
    positions = []
    cursor = 0
    for turn in turns:
        cursor = text.index(turn, cursor)
        positions.append(cursor)
    assert positions == sorted(positions)
    for other_version in ("OLD ANSWER", "ORIGINAL second question", "ANSWER TO THE ORIGINAL"):
        assert other_version not in text
    assert text.count("**You**") == 2
    assert text.count("**Assistant**") == 2
    # Timestamps on each turn.
    assert len(re.findall(r"\*\* · \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)) == 4


def test_markdown_notes_cancelled_replies_and_omits_an_empty_system_prompt(owner):
    conversation = services.create_conversation(owner=owner, title="", system_prompt="")
    question = Message.objects.create(conversation=conversation, role="user", content="Count")
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="1, 2, 3",
        status="cancelled",
        reply_to=question,
    )

    text = exports.export_markdown(conversation)

    assert text.startswith("# Untitled chat\n")
    assert "System prompt" not in text
    assert "1, 2, 3" in text
    assert "Stopped by the user" in text


def test_export_filenames_are_safe():
    cases = {
        "Trip: Rome & Paris / 2026": "trip-rome-paris-2026.json",
        '../../etc/passwd"; x=1': "etcpasswd-x1.json",
        "Ünïcödé \u2013 日本語": "unicode.json",
        "日本語": "conversation.json",
        "": "conversation.json",
    }
    for title, expected in cases.items():
        assert exports.export_filename(Conversation(title=title), "json") == expected
    assert len(exports.export_filename(Conversation(title="word " * 100), "md")) <= 63


# --- export through the API ----------------------------------------------------------------------


def downloaded_export(api, owner, fmt, content_type):
    """Asks for an export of a conversation of `owner` as `fmt`, and checks it comes as a
    download of `content_type` named after the conversation. Returns the response."""
    conversation, _ = make_versioned_conversation(owner)

    response = api.get(api_export_url(conversation), {"format": fmt})

    assert response.status_code == 200
    assert response["Content-Type"] == content_type
    assert SAFE_ATTACHMENT.match(response["Content-Disposition"])
    assert response["Content-Disposition"].endswith(f'filename="trip-rome-paris-2026.{fmt}"')
    return response


def test_api_export_json_is_a_download(api, owner):
    response = downloaded_export(api, owner, "json", "application/json")
    document = json.loads(response.content)
    assert document["format"] == exports.FORMAT
    assert len(document["messages"]) == 7


def test_api_export_defaults_to_json(api, owner):
    conversation, _ = make_versioned_conversation(owner)

    response = api.get(api_export_url(conversation))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content)["version"] == 1


def test_api_export_markdown_is_a_download(api, owner):
    response = downloaded_export(api, owner, "md", "text/markdown; charset=utf-8")
    text = response.content.decode("utf-8")
    assert text.startswith("# Trip: Rome & Paris / 2026\n")
    assert "Try **Trastevere**." in text
    assert "OLD ANSWER" not in text


def refused_export(client, owner, fmt, status) -> str:
    """Asks `client` for an export of a conversation of `owner` as `fmt`, and checks it is
    refused with `status`: a JSON error, not a download. Returns the error's detail."""
    conversation, _ = make_versioned_conversation(owner)

    response = client.get(api_export_url(conversation), {"format": fmt})

    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert "Content-Disposition" not in response
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    return detail


@pytest.mark.parametrize("fmt", ["xml", "html", "api"])
def test_api_export_rejects_unknown_formats_with_404(api, owner, fmt):
    assert "format" in refused_export(api, owner, fmt, 404)


@pytest.mark.parametrize("fmt", ["json", "md"])
def test_api_export_of_another_users_conversation_is_404_json(other_api, owner, fmt):
    refused_export(other_api, owner, fmt, 404)


@pytest.mark.parametrize("fmt", ["json", "md"])
def test_api_export_needs_authentication(anon_api, owner, fmt):
    refused_export(anon_api, owner, fmt, 401)


def test_api_import_needs_authentication(anon_api, owner):
    conversation, _ = make_versioned_conversation(owner)
    before = counts()

    response = anon_api.post(IMPORT_URL, exports.export_conversation(conversation), format="json")

    assert response.status_code == 401
    assert counts() == before


# --- import: round trip --------------------------------------------------------------------------


def test_round_trip_through_the_api(api, owner):
    original, _ = make_versioned_conversation(owner)
    document = json.loads(api.get(api_export_url(original), {"format": "json"}).content)

    response = api.post(IMPORT_URL, document, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] != str(original.pk)
    assert body["title"] == original.title
    assert body["system_prompt"] == original.system_prompt
    assert body["message_count"] == 4  # what the thread shows: the chosen versions
    assert response["Location"] == f"/api/conversations/{body['id']}/"
    imported = Conversation.objects.get(pk=body["id"])
    assert imported.owner == owner
    assert shape(imported) == shape(original)
    old_ids = set(original.messages.values_list("id", flat=True))
    old_groups = set(original.messages.values_list("version_group", flat=True))
    assert not old_ids & set(imported.messages.values_list("id", flat=True))
    assert not old_groups & set(imported.messages.values_list("version_group", flat=True))
    # The chosen versions are the same, so the transcripts match too.
    assert list(imported.messages.active_path().values_list("content", flat=True)) == list(
        original.messages.active_path().values_list("content", flat=True)
    )
    # The detail endpoint shows it like any other conversation.
    assert api.get(f"/api/conversations/{body['id']}/").json()["message_count"] == 4


def test_round_trip_of_a_conversation_written_by_the_model(owner, other_user, fake_engine):
    original, _ = services.start_conversation(owner=owner, content="Hello there")
    services.post_message(conversation=original, content="Second")

    imported = imports.import_conversation(
        owner=other_user, document=json.loads(json.dumps(exports.export_conversation(original)))
    )

    assert imported.owner == other_user
    assert imported.title == original.title
    assert shape(imported) == shape(original)
    assert [m.content for m in imported.messages.order_by("created_at")] == [
        "Hello there",
        "Echo: Hello there",
        "Second",
        "Echo: Second",
    ]


def test_ratings_and_context_records_survive_a_round_trip(owner, other_user, fake_engine):
    """A reply's rating and comment go along, and its record of what the model read points at
    the imported copies of the messages it kept."""
    original, _ = services.start_conversation(owner=owner, content="Hello there")
    second = services.post_message(conversation=original, content="Second").reply
    services.rate_reply(reply=second, rating=Message.Rating.DOWN, feedback="Echoes.")
    document = json.loads(json.dumps(exports.export_conversation(original)))
    exported = next(m for m in document["messages"] if m["id"] == str(second.pk))
    assert (exported["rating"], exported["feedback"]) == ("down", "Echoes.")

    imported = imports.import_conversation(owner=other_user, document=document)

    copy = imported.messages.get(content="Echo: Second")
    assert (copy.rating, copy.feedback) == (Message.Rating.DOWN, "Echoes.")
    assert copy.rated_at == second.rated_at
    kept = [imported.messages.get(pk=i).content for i in copy.context["messages"]]
    assert kept == ["Hello there", "Echo: Hello there"]
    assert copy.context["system_prompt"] == second.context["system_prompt"]
    assert services.reply_context(reply=copy).messages[0].conversation_id == imported.pk


def test_another_user_importing_an_export_leaves_the_original_alone(api, other_api, owner):
    original, _ = make_versioned_conversation(owner)
    before = shape(original)
    document = api.get(api_export_url(original)).json()

    response = other_api.post(IMPORT_URL, document, format="json")

    assert response.status_code == 201
    imported = Conversation.objects.get(pk=response.json()["id"])
    assert imported.owner.username == "intruder"
    assert shape(original) == before
    assert Conversation.objects.get(pk=original.pk).owner == owner
    # The importer sees the copy, not the original; the owner does not see the copy.
    assert other_api.get(api_export_url(original)).status_code == 404
    assert api.get(f"/api/conversations/{imported.pk}/").status_code == 404


def test_importing_twice_makes_two_independent_copies(api, owner):
    original, _ = make_versioned_conversation(owner)
    document = exports.export_conversation(original)

    first = api.post(IMPORT_URL, document, format="json").json()["id"]
    second = api.post(IMPORT_URL, document, format="json").json()["id"]

    assert first != second
    assert Conversation.objects.filter(owner=owner).count() == 3
    assert shape(Conversation.objects.get(pk=first)) == shape(original)
    assert shape(Conversation.objects.get(pk=second)) == shape(original)


def test_import_comes_first_in_the_list(api, owner):
    original, _ = make_versioned_conversation(owner)
    services.create_conversation(owner=owner, title="Newer")

    imported_id = api.post(IMPORT_URL, exports.export_conversation(original), format="json").json()[
        "id"
    ]

    assert api.get("/api/conversations/").json()["results"][0]["id"] == imported_id


def test_import_by_multipart_upload(api, owner):
    original, _ = make_versioned_conversation(owner)
    content = json.dumps(exports.export_conversation(original)).encode()

    response = api.post(IMPORT_URL, {"file": upload(content)}, format="multipart")

    assert response.status_code == 201, response.content
    assert shape(Conversation.objects.get(pk=response.json()["id"])) == shape(original)


def test_multipart_import_without_a_file_is_400(api):
    before = counts()

    response = api.post(IMPORT_URL, {"other": "x"}, format="multipart")

    assert response.status_code == 400
    assert "file" in response.json()["detail"]
    assert counts() == before


def test_import_of_a_minimal_hand_made_document(owner):
    conversation = imports.import_conversation(owner=owner, document=minimal_document())

    messages = list(conversation.messages.order_by("created_at"))
    assert [(m.role, m.content, m.status, m.is_active) for m in messages] == [
        ("user", "hello", "ok", True),
        ("assistant", "hi", "ok", True),
    ]
    assert messages[1].reply_to == messages[0]
    assert messages[0].version_group != messages[1].version_group
    assert conversation.title == "Hand-made"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({}, "Default prompt."),
        ({"system_prompt": None}, "Default prompt."),
        ({"system_prompt": ""}, ""),
        ({"system_prompt": "Be brief."}, "Be brief."),
    ],
    ids=["omitted", "null", "empty", "text"],
)
def test_an_imported_system_prompt_means_what_it_means_everywhere(owner, settings, given, stored):
    settings.CHATBOT_SYSTEM_PROMPT = "Default prompt."
    document = minimal_document(conversation={"title": "Hand-made", **given})

    conversation = imports.import_conversation(owner=owner, document=document)

    assert conversation.system_prompt == stored


def test_a_reply_still_streaming_is_imported_as_interrupted(owner):
    document = with_message(1, status="streaming", content="half a sent")

    conversation = imports.import_conversation(owner=owner, document=document)

    reply = conversation.messages.get(role="assistant")
    assert reply.status == "interrupted"
    assert reply.content == "half a sent"


def test_import_accepts_replies_listed_before_their_question(owner):
    document = minimal_document()
    document["messages"].reverse()

    conversation = imports.import_conversation(owner=owner, document=document)

    reply = conversation.messages.get(role="assistant")
    assert reply.reply_to.content == "hello"


# --- import: validation --------------------------------------------------------------------------


def _too_many() -> dict:
    document = minimal_document()
    document["messages"] = [
        {"id": str(i), "role": "user", "content": "x", "created_at": "2026-01-01T10:00:00Z"}
        for i in range(imports.MAX_MESSAGES + 1)
    ]
    return document


def _without(key) -> dict:
    document = minimal_document()
    del document[key]
    return document


def _message_without(key) -> dict:
    document = minimal_document()
    del document["messages"][0][key]
    return document


INVALID_DOCUMENTS = {
    "json array": ([minimal_document()], "array"),
    "json string": ("a string", "string"),
    "wrong format marker": (minimal_document(format="something.else"), "format"),
    "no format marker": (_without("format"), "format"),
    "wrong version": (minimal_document(version=2), "version 2"),
    "version as a string": (minimal_document(version="1"), "version"),
    "missing messages": (_without("messages"), "messages"),
    "messages not a list": (minimal_document(messages={"a": 1}), "messages"),
    "missing conversation": (_without("conversation"), "conversation"),
    "message not an object": (minimal_document(messages=["hello"]), "messages[0]"),
    "message without role": (_message_without("role"), "messages[0].role is required"),
    "message without content": (_message_without("content"), "messages[0].content"),
    "message without id": (_message_without("id"), "messages[0].id"),
    "message without created_at": (_message_without("created_at"), "created_at"),
    "bad role": (with_message(0, role="robot"), "robot"),
    "bad status": (with_message(1, status="great"), "great"),
    "content not a string": (with_message(0, content=42), "string"),
    "bad reply_to": (with_message(1, reply_to="nope"), "reply_to"),
    "reply to itself": (with_message(1, reply_to="b"), "itself"),
    "duplicate ids": (with_message(1, id="a", reply_to=None), "twice"),
    "bad timestamp": (with_message(0, created_at="yesterday"), "ISO 8601"),
    "is_active not a boolean": (with_message(0, is_active="yes"), "true or false"),
    "negative token count": (with_message(1, prompt_tokens=-1), "prompt_tokens"),
    "token count as a boolean": (with_message(1, completion_tokens=True), "completion_tokens"),
    "params not an object": (with_message(1, generation_params=[1]), "generation_params"),
    "NUL in params": (with_message(1, generation_params={"a": "x\x00"}), "NUL"),
    "empty user message": (with_message(0, content="   "), "empty"),
    "content with NUL": (with_message(0, content="bad\x00byte"), "NUL"),
    "title with NUL": (
        minimal_document(conversation={"title": "a\x00b", "system_prompt": ""}),
        "NUL",
    ),
    "title too long": (
        minimal_document(conversation={"title": "t" * 201, "system_prompt": ""}),
        "title",
    ),
    "temperature out of range": (
        minimal_document(conversation={"title": "", "system_prompt": "", "temperature": 9}),
        "temperature",
    ),
    "too many messages": (_too_many(), f"limit is {imports.MAX_MESSAGES}"),
    "bad rating": (with_message(1, rating="sideways"), "rating"),
    "feedback too long": (with_message(1, feedback="x" * 2001), "feedback"),
    "context not an object": (with_message(1, context=[1]), "context must be an object"),
    "context of unknown messages": (
        with_message(1, context={"messages": ["zz"], "dropped": 0}),
        '"zz" is not the id of a message',
    ),
    "context dropping less than none": (
        with_message(1, context={"messages": [], "dropped": -1}),
        "dropped",
    ),
}


@pytest.mark.parametrize("case", INVALID_DOCUMENTS, ids=list(INVALID_DOCUMENTS))
def test_api_import_rejects_invalid_documents(api, owner, case):
    document, expected = INVALID_DOCUMENTS[case]
    make_versioned_conversation(owner)  # something to leave alone
    before = counts()

    response = api.post(IMPORT_URL, copy.deepcopy(document), format="json")

    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert expected in detail
    assert counts() == before


def test_api_import_rejects_content_over_the_message_limit(api, settings):
    settings.CHATBOT_MAX_MESSAGE_CHARS = 50
    before = counts()

    response = api.post(IMPORT_URL, with_message(1, content="y" * 51), format="json")

    assert response.status_code == 400
    assert response.json()["detail"] == ("messages[1].content is 51 characters; the limit is 50.")
    assert counts() == before


def test_api_import_rejects_content_over_the_default_limit(api, settings):
    limit = settings.CHATBOT_MAX_MESSAGE_CHARS
    before = counts()

    response = api.post(IMPORT_URL, with_message(0, content="z" * (limit + 1)), format="json")

    assert response.status_code == 400
    assert f"the limit is {limit}" in response.json()["detail"]
    assert counts() == before


@pytest.mark.parametrize(
    "body",
    [b"this is not json", b'{"format": ', b'{"a": NaN}', b"\xff\xfe not utf-8"],
    ids=["text", "truncated", "nan", "binary"],
)
def test_api_import_rejects_bodies_that_are_not_json(api, body):
    before = counts()

    response = api.post(IMPORT_URL, body, content_type="application/json")

    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)
    assert counts() == before


@pytest.mark.parametrize(
    "content",
    [b"not json at all", b"[1, 2]", json.dumps(minimal_document(version=7)).encode(), b"\xff"],
    ids=["text", "array", "version", "binary"],
)
def test_api_multipart_import_rejects_bad_files(api, content):
    before = counts()

    response = api.post(IMPORT_URL, {"file": upload(content)}, format="multipart")

    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)
    assert counts() == before


def test_api_import_refuses_large_uploads(api, settings):
    settings.CHATBOT_MAX_IMPORT_BYTES = 2000
    big = json.dumps(with_message(0, content="w" * 3000)).encode()
    before = counts()

    as_file = api.post(IMPORT_URL, {"file": upload(big)}, format="multipart")
    as_body = api.post(IMPORT_URL, big, content_type="application/json")

    for response in (as_file, as_body):
        assert response.status_code == 413
        assert "largest import" in response.json()["detail"]
    assert counts() == before


def test_a_reply_loop_is_rejected(owner):
    document = minimal_document()
    document["messages"][0]["reply_to"] = "b"
    before = counts()

    with pytest.raises(imports.InvalidImport, match="loop"):
        imports.import_conversation(owner=owner, document=document)
    assert counts() == before


def test_a_failure_while_writing_leaves_nothing_behind(owner, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Message.objects, "bulk_create", fail)
    before = counts()

    with pytest.raises(RuntimeError):
        imports.import_conversation(owner=owner, document=minimal_document())
    assert counts() == before


# --- pages ---------------------------------------------------------------------------------------


def test_thread_page_links_to_both_exports(client, owner):
    conversation, _ = make_versioned_conversation(owner)
    client.force_login(owner)

    page = client.get(f"/c/{conversation.pk}/").content.decode()

    assert "Export JSON" in page
    assert "Export Markdown" in page
    assert f'href="/c/{conversation.pk}/export/?format=json"' in page
    assert f'href="/c/{conversation.pk}/export/?format=md"' in page


def test_list_page_has_the_import_form(client, owner):
    client.force_login(owner)

    page = client.get("/").content.decode()

    assert "Import a chat" in page
    assert 'action="/import/"' in page
    assert 'enctype="multipart/form-data"' in page
    assert 'type="file"' in page
    assert 'accept=".json' in page


@pytest.mark.parametrize(
    ("fmt", "content_type", "extension"),
    [
        ("json", "application/json", "json"),
        ("md", "text/markdown; charset=utf-8", "md"),
        (None, "application/json", "json"),
    ],
)
def test_page_export_downloads(client, owner, fmt, content_type, extension):
    conversation, _ = make_versioned_conversation(owner)
    client.force_login(owner)

    response = client.get(page_export_url(conversation), {"format": fmt} if fmt else {})

    assert response.status_code == 200
    assert response["Content-Type"] == content_type
    assert SAFE_ATTACHMENT.match(response["Content-Disposition"])
    assert response["Content-Disposition"].endswith(f'"trip-rome-paris-2026.{extension}"')
    body = response.content.decode("utf-8")
    if extension == "json":
        assert json.loads(body)["messages"][0]["content"] == "Where should I eat in Rome?"
    else:
        assert body.startswith("# Trip: Rome & Paris / 2026")


def test_page_export_of_another_users_conversation_is_404(client, owner, other_user):
    conversation, _ = make_versioned_conversation(owner)
    client.force_login(other_user)

    for fmt in ("json", "md"):
        assert client.get(page_export_url(conversation), {"format": fmt}).status_code == 404


def test_page_export_of_an_unknown_format_is_404(client, owner):
    conversation, _ = make_versioned_conversation(owner)
    client.force_login(owner)

    assert client.get(page_export_url(conversation), {"format": "pdf"}).status_code == 404


@pytest.mark.parametrize("fmt", ["json", "md"])
def test_the_page_and_the_api_send_the_same_file(api, client, owner, fmt):
    conversation, _ = make_versioned_conversation(owner)
    client.force_login(owner)

    page = client.get(page_export_url(conversation), {"format": fmt})
    from_api = api.get(api_export_url(conversation), {"format": fmt})

    for header in ("Content-Type", "Content-Disposition"):
        assert page[header] == from_api[header]
    # Only the moment of the export may differ.
    if fmt == "json":
        stamps = [json.loads(r.content)["exported_at"].encode() for r in (page, from_api)]
        assert from_api.content.replace(stamps[1], stamps[0]) == page.content
    else:
        exported_line = re.compile(rb"^\*Exported [^\n]*$", re.MULTILINE)
        assert exported_line.sub(b"", from_api.content) == exported_line.sub(b"", page.content)


def test_pages_send_anonymous_users_to_login(client, owner):
    conversation, _ = make_versioned_conversation(owner)
    before = counts()

    export = client.get(page_export_url(conversation), {"format": "json"})
    imported = client.post("/import/", {"file": upload(b"{}")})

    for response in (export, imported):
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    assert counts() == before


def test_page_import_of_a_good_file_opens_the_new_thread(client, owner):
    original, _ = make_versioned_conversation(owner)
    client.force_login(owner)
    content = client.get(page_export_url(original), {"format": "json"}).content

    response = client.post("/import/", {"file": upload(content)})

    imported = Conversation.objects.exclude(pk=original.pk).get(owner=owner)
    assert response.status_code == 302
    assert response["Location"] == f"/c/{imported.pk}/"
    assert shape(imported) == shape(original)
    page = client.get(response["Location"]).content.decode()
    assert "Imported" in page
    assert "Where should I eat in Rome?" in page


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "array"),
        (json.dumps(minimal_document(format="x")).encode(), "Not a conversation export"),
        (json.dumps(with_message(0, role="robot")).encode(), "robot"),
    ],
    ids=["text", "array", "format", "role"],
)
def test_page_import_of_a_bad_file_shows_an_error(client, owner, content, expected):
    client.force_login(owner)
    before = counts()

    response = client.post("/import/", {"file": upload(content)}, follow=True)

    assert response.redirect_chain == [("/", 302)]
    page = response.content.decode()
    assert "Could not import the file" in page
    assert expected in page
    assert counts() == before


def test_page_import_without_a_file_shows_an_error(client, owner):
    client.force_login(owner)

    response = client.post("/import/", {}, follow=True)

    assert "Choose a JSON export file" in response.content.decode()
    assert counts() == (0, 0)


def test_page_import_refuses_large_files(client, owner, settings):
    settings.CHATBOT_MAX_IMPORT_BYTES = 1000
    client.force_login(owner)

    response = client.post("/import/", {"file": upload(b" " * 2000)}, follow=True)

    assert "largest import accepted" in response.content.decode()
    assert counts() == (0, 0)


def test_import_page_get_goes_to_the_list(client, owner):
    client.force_login(owner)

    response = client.get("/import/")

    assert response.status_code == 302
    assert response["Location"] == "/"


# --- schema --------------------------------------------------------------------------------------


def test_schema_documents_export_and_import(api):
    schema = json.loads(api.get("/api/schema/", {"format": "json"}).content)

    export = schema["paths"]["/api/conversations/{id}/export/"]["get"]
    assert {p["name"] for p in export["parameters"]} >= {"id", "format"}
    assert set(export["responses"]["200"]["content"]) == {"application/json", "text/markdown"}
    imported = schema["paths"]["/api/conversations/import/"]["post"]
    assert set(imported["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "201" in imported["responses"]


def test_schema_still_generates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml"))
    assert "/api/conversations/import/" in (tmp_path / "s.yml").read_text()


# --- import: text and dates no database can store -------------------------------------------------


def _raw(document: dict) -> bytes:
    """The document as JSON text with every non-ASCII character escaped, as `\\ud800` is."""
    return json.dumps(document, ensure_ascii=True).encode()


SURROGATE = "x\ud800y"
UNSTORABLE_DOCUMENTS = {
    "title": (
        minimal_document(conversation={"title": SURROGATE, "system_prompt": ""}),
        "conversation.title",
    ),
    "system prompt": (
        minimal_document(conversation={"title": "", "system_prompt": SURROGATE}),
        "conversation.system_prompt",
    ),
    "content": (with_message(0, content=SURROGATE), "messages[0].content"),
    "error": (with_message(1, error=SURROGATE), "messages[1].error"),
    "model": (with_message(1, model=SURROGATE), "messages[1].model"),
    "params value": (with_message(1, generation_params={"k": "\ud800"}), "generation_params"),
    "params key": (with_message(1, generation_params={"\udfff": 1}), "generation_params"),
    "nested params": (
        with_message(1, generation_params={"a": [{"b": ["ok", "\ud800"]}]}),
        "generation_params",
    ),
    "unknown field": (with_message(0, note=SURROGATE), "messages[0]"),
    "unknown key": (minimal_document(**{"\ud800": 1}), "surrogate"),
}


@pytest.mark.parametrize("case", UNSTORABLE_DOCUMENTS, ids=list(UNSTORABLE_DOCUMENTS))
@pytest.mark.parametrize("how", ["body", "file"])
def test_import_rejects_lone_surrogates_anywhere(api, owner, case, how):
    document, where = UNSTORABLE_DOCUMENTS[case]
    before = counts()

    if how == "body":
        response = api.post(IMPORT_URL, _raw(document), content_type="application/json")
    else:
        response = api.post(IMPORT_URL, {"file": upload(_raw(document))}, format="multipart")

    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    assert "surrogate" in detail
    assert where in detail
    assert counts() == before


def test_the_importer_itself_checks_every_string(owner):
    document = with_message(1, generation_params={"k": "\ud800"})
    before = counts()

    with pytest.raises(imports.InvalidImport, match="surrogate"):
        imports.import_conversation(owner=owner, document=document)
    assert counts() == before


@pytest.mark.parametrize(
    "moment", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"], ids=["late", "early"]
)
@pytest.mark.parametrize("field", ["conversation", "message"])
def test_import_rejects_dates_out_of_range(api, owner, moment, field):
    if field == "conversation":
        document = minimal_document(
            conversation={"title": "", "system_prompt": "", "created_at": moment}
        )
    else:
        document = with_message(0, created_at=moment)
    before = counts()

    response = api.post(IMPORT_URL, document, format="json")

    assert response.status_code == 400, response.content
    assert "out of range" in response.json()["detail"]
    assert counts() == before


def test_import_keeps_dates_at_the_edges_of_the_range(api, owner):
    document = with_message(0, created_at="9999-12-31T23:59:59+00:00")
    document["messages"][1]["created_at"] = "0001-01-01T00:00:00Z"

    response = api.post(IMPORT_URL, document, format="json")

    assert response.status_code == 201, response.content


def test_an_imported_title_loses_control_and_bidi_characters(api, owner):
    document = minimal_document(
        conversation={"title": "Old\nchat\x1b[31m \u202eexe", "system_prompt": ""}
    )

    response = api.post(IMPORT_URL, document, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["title"] == "Old chat[31m exe"
