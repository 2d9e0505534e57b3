"""Streaming replies (SSE), stopping them, versions (regenerate, edit, activate), interrupted
replies, per-conversation generation parameters and model-written titles."""

import json
from datetime import timedelta

import pytest
import yaml
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import replies, services
from conversations.api.serializers import MessageSerializer, message_data
from conversations.leases import keeper
from conversations.llm.engine import Generation
from conversations.models import Conversation, Message
from tests.test_api import REPLY_STATS

pytestmark = pytest.mark.django_db

SSE = "text/event-stream"
SCRIPTED = "one two three four five six seven eight"


# --- helpers -----------------------------------------------------------------------------------


def make_conversation(user, title="Chat", **kwargs) -> Conversation:
    return services.create_conversation(owner=user, title=title, **kwargs)


def url(conversation, action: str = "messages") -> str:
    return f"/api/conversations/{conversation.pk}/{action}/"


def parse_block(block: str) -> tuple[str, object]:
    kind, data = None, []
    for line in block.split("\n"):
        if line.startswith("event:"):
            kind = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].lstrip())
    assert kind is not None, block
    return kind, json.loads("\n".join(data))


def parse_events(raw: bytes) -> list[tuple[str, object]]:
    """`event:`/`data:` blocks, separated by blank lines, as (kind, decoded data) pairs."""
    return [parse_block(block) for block in raw.decode().split("\n\n") if block.strip()]


class EventReader:
    """Reads a streaming response one event at a time, so a test can act between events."""

    def __init__(self, response) -> None:
        self.chunks = iter(response.streaming_content)
        self.buffer = ""

    def next(self) -> tuple[str, object]:
        while "\n\n" not in self.buffer:
            self.buffer += next(self.chunks).decode()
        block, self.buffer = self.buffer.split("\n\n", 1)
        return parse_block(block)

    def until(self, kind: str) -> tuple[str, object]:
        while True:
            event = self.next()
            if event[0] == kind:
                return event

    def rest(self) -> list[tuple[str, object]]:
        raw = self.buffer.encode() + b"".join(self.chunks)
        self.buffer = ""
        return parse_events(raw)


def kinds(events) -> list[str]:
    return [kind for kind, _ in events]


def assert_is_stream(response) -> None:
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith(SSE)


def stream_post(api, path, data=None, *, how="accept"):
    """POST asking for SSE, by Accept header or by `"stream": true` in the body."""
    data = dict(data or {})
    if how == "accept":
        return api.post(path, data, format="json", HTTP_ACCEPT=SSE)
    return api.post(path, {**data, "stream": True}, format="json")


def post(api, conversation, content: str):
    response = api.post(url(conversation), {"content": content}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def listed(api, conversation, include: str | None = None) -> list[dict]:
    params = {"include": include} if include else {}
    response = api.get(url(conversation), params)
    assert response.status_code == 200
    return response.json()["results"]


def assert_409(response) -> str:
    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert detail
    return detail


# --- 1. SSE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["accept", "body"])
def test_streamed_message_sends_user_message_deltas_done(api, owner, fake_engine, how):
    conversation = make_conversation(owner)

    with CaptureQueriesContext(connection) as queries:
        response = stream_post(api, url(conversation), {"content": "Hello there friend"}, how=how)
        body = b"".join(response.streaming_content)

    assert_is_stream(response)
    assert "no-cache" in response["Cache-Control"] and "no-store" in response["Cache-Control"]
    events = parse_events(body)
    names = kinds(events)
    assert names[0] == "user_message"
    assert names[-1] == "done"
    assert set(names[1:-1]) == {"delta"}
    assert len(names[1:-1]) == 4  # "Echo:", "Hello", "there", "friend"
    assert "title" not in names

    user_message = events[0][1]
    assert user_message["role"] == "user"
    assert user_message["content"] == "Hello there friend"

    text = "".join(data["text"] for kind, data in events if kind == "delta")
    done = events[-1][1]
    assert text == done["content"] == "Echo: Hello there friend"
    assert done["status"] == "ok"
    assert done["role"] == "assistant"
    assert set(done) >= REPLY_STATS
    assert done["completion_tokens"] == 4
    assert done["model"] == "fake-echo"
    assert "Echo: Hello there friend" in done["html"]
    assert (user_message["version"], user_message["versions"]) == (1, 1)
    assert (done["version"], done["versions"]) == (1, 1)
    # A new question and its reply are the first of their versions: nothing counts siblings.
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert done["reply_to"] == user_message["id"]

    reply = Message.objects.get(pk=done["id"])
    assert reply.status == Message.Status.OK
    assert reply.content == text
    assert str(reply.reply_to_id) == user_message["id"]
    assert reply.completion_tokens == 4
    assert reply.generation_params["finish_reason"] == "stop"
    assert conversation.messages.count() == 2


def test_message_data_is_what_a_serializer_of_its_own_gives(owner):
    conversation = make_conversation(owner)
    question = Message.objects.create(conversation=conversation, role="user", content="Hi")
    failed = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="Half",
        status=Message.Status.ERROR,
        error="RuntimeError: boom",
        reply_to=question,
        completion_tokens=3,
    )
    answered = Message.objects.create(
        conversation=conversation, role="assistant", content="Hello", reply_to=question
    )
    answered.version, answered.versions = 2, 2

    # One shared serializer, in turn: nothing of one message stays for the next.
    for message in (failed, question, answered, failed):
        assert message_data(message) == MessageSerializer(message).data
    assert "error" not in message_data(answered)
    assert "completion_tokens" not in message_data(question)
    assert (message_data(answered)["version"], message_data(answered)["versions"]) == (2, 2)


def test_stream_done_html_renders_markdown(api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.replies = ["Some **bold** words"]

    response = stream_post(api, url(conversation), {"content": "Hi"})

    done = parse_events(b"".join(response.streaming_content))[-1][1]
    assert done["content"] == "Some **bold** words"
    assert "<strong>bold</strong>" in done["html"]


def test_json_answer_is_not_a_stream(api, owner, fake_engine):
    conversation = make_conversation(owner)

    response = api.post(url(conversation), {"content": "Hi", "stream": False}, format="json")

    assert response.status_code == 201
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["reply"]["content"] == "Echo: Hi"


# --- 2. the row is reserved with the question, and has text from the first token -----------------


def test_reply_row_is_reserved_with_the_question_and_has_text_from_the_first_token(
    api, owner, fake_engine
):
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]

    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    assert reader.next()[0] == "user_message"
    reserved = conversation.messages.get(role="assistant")
    assert (reserved.status, reserved.content) == (Message.Status.STREAMING, "")

    kind, data = reader.next()
    assert (kind, data) == ("delta", {"text": "one"})
    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.STREAMING
    assert reply.content == "one"
    assert reply.reply_to.content == "Count"

    rest = reader.rest()
    assert rest[-1][0] == "done"
    reply.refresh_from_db()
    assert reply.status == Message.Status.OK
    assert reply.content == SCRIPTED
    assert rest[-1][1]["id"] == str(reply.pk)


def stream_saving_every_piece(api, owner, fake_engine, monkeypatch):
    """A conversation and a reader of its reply of SCRIPTED words, each saved as it comes,
    after the first word."""
    monkeypatch.setattr(replies, "FLUSH_SECONDS", 0)
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]
    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    assert reader.until("delta") == ("delta", {"text": "one"})
    return conversation, reader


def test_streaming_reply_text_is_saved_while_it_is_written(api, owner, fake_engine, monkeypatch):
    conversation, reader = stream_saving_every_piece(api, owner, fake_engine, monkeypatch)
    reader.next()

    reply = conversation.messages.get(role="assistant")
    # The third word is saved when the model writes the fourth at the latest.
    assert reply.content.startswith("one two")
    assert reply.status == Message.Status.STREAMING
    reader.rest()


# --- 3. stop -----------------------------------------------------------------------------------


def test_stop_cancels_the_running_reply_and_keeps_its_text(api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]
    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    assert reader.until("delta") == ("delta", {"text": "one"})
    assert reader.next() == ("delta", {"text": " two"})

    stop = api.post(url(conversation, "stop"), format="json")

    assert stop.status_code == 200
    assert stop.json() == {"stopped": True, "detail": stop.json()["detail"]}
    assert stop.json()["detail"]
    rest = reader.rest()
    assert rest[-1][0] == "done"
    assert set(kinds(rest[:-1])) <= {"delta"}
    done = rest[-1][1]
    assert done["status"] == "cancelled"
    reply = Message.objects.get(pk=done["id"])
    assert reply.status == Message.Status.CANCELLED
    assert reply.content == done["content"]
    assert 2 <= len(reply.content.split()) < len(SCRIPTED.split())
    assert SCRIPTED.startswith(reply.content)
    assert reply.generation_params["finish_reason"] == "cancelled"
    assert not keeper.stop_conversation(conversation.pk)  # nothing left running here

    # Stopped, the conversation takes the next message.
    post(api, conversation, "Next")


def test_stop_with_nothing_running(api, owner, fake_engine):
    conversation = make_conversation(owner)
    post(api, conversation, "Hi")

    response = api.post(url(conversation, "stop"), format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["stopped"] is False
    assert "nothing" in body["detail"].lower()
    assert conversation.messages.get(role="assistant").status == Message.Status.OK


def test_stop_marks_a_reply_written_by_another_process(api, owner, fake_engine):
    conversation = make_conversation(owner)
    question = Message.objects.create(conversation=conversation, role="user", content="Q")
    row = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="partial",
        status=Message.Status.STREAMING,
        reply_to=question,
    )

    response = api.post(url(conversation, "stop"), format="json")

    assert response.json()["stopped"] is True
    row.refresh_from_db()
    assert row.status == Message.Status.CANCELLED
    assert row.content == "partial"


def test_stop_of_another_users_conversation_is_404(api, other_api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]
    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    reader.until("delta")

    response = other_api.post(url(conversation, "stop"), format="json")

    assert response.status_code == 404
    rest = reader.rest()
    assert rest[-1][1]["status"] == "ok"
    assert rest[-1][1]["content"] == SCRIPTED


@pytest.mark.parametrize("where", ["api", "page"])
def test_deleting_a_conversation_stops_the_reply_being_written(
    api, client, owner, fake_engine, where
):
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]
    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    assert reader.until("delta") == ("delta", {"text": "one"})

    if where == "api":
        response = api.delete(f"/api/conversations/{conversation.pk}/")
        assert response.status_code == 204
    else:
        client.force_login(owner)
        response = client.post(f"/c/{conversation.pk}/delete/")
        assert response.status_code == 302

    rest = reader.rest()
    assert rest[-1][0] == "done"
    assert rest[-1][1]["status"] == "cancelled"
    assert len(rest[-1][1]["content"].split()) < len(SCRIPTED.split())
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    assert not keeper.stop_conversation(conversation.pk)  # nothing left running here


def test_stop_without_credentials_is_401(anon_api, owner, fake_engine):
    conversation = make_conversation(owner)

    response = anon_api.post(url(conversation, "stop"), format="json")

    assert response.status_code == 401


# --- 4. the client goes away ---------------------------------------------------------------------


def test_closing_the_stream_early_saves_the_partial_reply_as_cancelled(api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.replies = [SCRIPTED]
    response = stream_post(api, url(conversation), {"content": "Count"})
    reader = EventReader(response)
    reader.until("delta")
    reader.next()

    response.close()

    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.CANCELLED
    assert 2 <= len(reply.content.split()) < len(SCRIPTED.split())
    assert SCRIPTED.startswith(reply.content)
    assert not conversation.messages.filter(status=Message.Status.STREAMING).exists()
    assert not keeper.stop_conversation(conversation.pk)  # nothing left running here
    post(api, conversation, "Next")


@pytest.mark.parametrize("events_read", [0, 1], ids=["nothing-read", "user-message-read"])
def test_a_stream_closed_before_the_reply_starts_cancels_its_reserved_reply(
    api, owner, fake_engine, events_read
):
    """The client went away before the writer began (its socket closed before the first event,
    or right after the user message): the reserved reply is cancelled at once, and the
    conversation takes the next message."""
    conversation = make_conversation(owner)
    response = stream_post(api, url(conversation), {"content": "Hello"})
    reader = EventReader(response)
    for _ in range(events_read):
        assert reader.next()[0] == "user_message"

    response.close()

    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.CANCELLED and reply.content == ""
    assert fake_engine.calls == []  # the model was never asked
    post(api, conversation, "Next")


# --- 5. failures ---------------------------------------------------------------------------------


def test_failure_mid_stream_sends_an_error_event_and_keeps_the_rows(api, owner, fake_engine):
    conversation = make_conversation(owner, system_prompt="Sys.")
    fake_engine.fail_with = RuntimeError("boom")
    fake_engine.fail_after = 2

    response = stream_post(api, url(conversation), {"content": "Tell me a story"})

    assert_is_stream(response)
    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events) == ["user_message", "delta", "delta", "error"]
    error = events[-1][1]
    assert "boom" in error["detail"]
    assert error["reply"]["status"] == "error"
    assert "RuntimeError" in error["reply"]["error"]

    question = conversation.messages.get(role="user")
    assert question.content == "Tell me a story"
    reply = conversation.messages.get(role="assistant")
    assert str(reply.pk) == error["reply"]["id"]
    assert reply.status == Message.Status.ERROR
    assert "RuntimeError" in reply.error
    assert "boom" in reply.error
    assert reply.reply_to == question
    assert reply.content == "Echo: Tell"
    # The event shows the reply as stored.
    assert error["reply"]["content"] == reply.content
    assert not keeper.stop_conversation(conversation.pk)  # nothing left running here

    fake_engine.fail_with = None
    fake_engine.calls.clear()
    again = api.post(url(conversation), {"content": "Again"}, format="json")

    assert again.status_code == 201
    assert again.json()["reply"]["status"] == "ok"
    assert fake_engine.calls == [
        [
            {"role": "system", "content": "Sys."},
            {"role": "user", "content": "Tell me a story"},
            {"role": "user", "content": "Again"},
        ]
    ]


def test_failure_mid_answer_as_json_is_503_with_the_saved_text(api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.fail_with = RuntimeError("boom")
    fake_engine.fail_after = 2

    response = api.post(url(conversation), {"content": "Tell me a story"}, format="json")

    assert response.status_code == 503
    body = response.json()
    assert "boom" in body["detail"]
    reply = Message.objects.get(pk=body["reply"]["id"])
    assert reply.status == Message.Status.ERROR
    assert body["reply"]["content"] == reply.content == "Echo: Tell"


def test_failure_before_the_first_token_sends_an_error_event(api, owner, fake_engine):
    conversation = make_conversation(owner)
    fake_engine.fail_with = RuntimeError("early")

    response = stream_post(api, url(conversation), {"content": "Hi"})

    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events) == ["user_message", "error"]
    assert "early" in events[-1][1]["detail"]
    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.ERROR
    assert reply.content == ""


# --- 6. regenerate -------------------------------------------------------------------------------


def test_regenerate_adds_a_new_active_version_of_the_reply(api, owner, fake_engine):
    conversation = make_conversation(owner, system_prompt="")
    fake_engine.replies = ["First answer", "Second answer"]
    first = post(api, conversation, "Question")

    response = api.post(url(conversation, "regenerate"), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["user_message"]["id"] == first["user_message"]["id"]
    reply = body["reply"]
    assert reply["content"] == "Second answer"
    assert reply["status"] == "ok"
    assert reply["version"] == 2
    assert reply["versions"] == 2
    assert reply["is_active"] is True
    assert reply["reply_to"] == first["user_message"]["id"]
    assert reply["version_group"] == first["reply"]["version_group"]
    # The model answered the same question again, without the first answer.
    assert fake_engine.calls[1] == [{"role": "user", "content": "Question"}]

    active = listed(api, conversation)
    assert [m["content"] for m in active] == ["Question", "Second answer"]
    everything = listed(api, conversation, "all")
    assert [(m["content"], m["is_active"]) for m in everything] == [
        ("Question", True),
        ("First answer", False),
        ("Second answer", True),
    ]
    assert [(m["version"], m["versions"]) for m in everything[1:]] == [(1, 2), (2, 2)]

    fake_engine.calls.clear()
    post(api, conversation, "Next")
    assert fake_engine.calls == [
        [
            {"role": "user", "content": "Question"},
            {"role": "assistant", "content": "Second answer"},
            {"role": "user", "content": "Next"},
        ]
    ]


@pytest.mark.parametrize("how", ["accept", "body"])
def test_regenerate_streams(api, owner, fake_engine, how):
    conversation = make_conversation(owner)
    fake_engine.replies = ["First answer", "Second answer here"]
    post(api, conversation, "Question")

    response = stream_post(api, url(conversation, "regenerate"), how=how)

    assert_is_stream(response)
    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events) == ["delta", "delta", "delta", "done"]
    done = events[-1][1]
    assert done["content"] == "Second answer here"
    assert (done["version"], done["versions"]) == (2, 2)
    assert Message.objects.get(pk=done["id"]).is_active


def test_regenerate_with_no_messages_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner)

    response = api.post(url(conversation, "regenerate"), format="json")

    assert assert_409(response)
    assert not conversation.messages.exists()
    assert fake_engine.calls == []


def test_regenerate_of_another_users_conversation_is_404(other_api, owner, fake_engine):
    conversation = make_conversation(owner)
    services.post_message(conversation=conversation, content="Question")

    response = other_api.post(url(conversation, "regenerate"), format="json")

    assert response.status_code == 404
    assert conversation.messages.count() == 2


# --- 7. activate ---------------------------------------------------------------------------------


def regenerated(api, conversation, fake_engine) -> tuple[dict, dict]:
    fake_engine.replies = ["First answer", "Second answer"]
    first = post(api, conversation, "Question")
    second = api.post(url(conversation, "regenerate"), format="json").json()
    return first, second


def test_activate_switches_back_to_an_earlier_reply(api, owner, fake_engine):
    conversation = make_conversation(owner, system_prompt="")
    first, second = regenerated(api, conversation, fake_engine)
    old_id = first["reply"]["id"]

    response = api.post(url(conversation, "activate"), {"message": old_id}, format="json")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == old_id
    assert body["is_active"] is True
    assert (body["version"], body["versions"]) == (1, 2)
    assert Message.objects.get(pk=old_id).is_active
    assert not Message.objects.get(pk=second["reply"]["id"]).is_active
    assert [m["content"] for m in listed(api, conversation)] == ["Question", "First answer"]

    fake_engine.calls.clear()
    post(api, conversation, "Next")
    assert fake_engine.calls == [
        [
            {"role": "user", "content": "Question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Next"},
        ]
    ]


def test_activate_outside_the_last_exchange_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner)
    first, second = regenerated(api, conversation, fake_engine)
    post(api, conversation, "Another question")

    response = api.post(
        url(conversation, "activate"), {"message": first["reply"]["id"]}, format="json"
    )

    assert assert_409(response)
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active
    assert Message.objects.get(pk=second["reply"]["id"]).is_active


def test_activate_a_message_of_another_conversation_is_404(api, owner, fake_engine):
    conversation = make_conversation(owner)
    other = make_conversation(owner, "Other")
    first, _ = regenerated(api, other, fake_engine)

    response = api.post(
        url(conversation, "activate"), {"message": first["reply"]["id"]}, format="json"
    )

    assert response.status_code == 404
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active


def test_activate_in_another_users_conversation_is_404(api, other_api, owner, fake_engine):
    conversation = make_conversation(owner)
    first, _ = regenerated(api, conversation, fake_engine)

    response = other_api.post(
        url(conversation, "activate"), {"message": first["reply"]["id"]}, format="json"
    )

    assert response.status_code == 404
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active


@pytest.mark.parametrize(
    "body", [{"message": "not-a-uuid"}, {"message": "1234"}, {"message": None}, {}]
)
def test_activate_with_a_malformed_id_is_400(api, owner, fake_engine, body):
    conversation = make_conversation(owner)
    post(api, conversation, "Question")

    response = api.post(url(conversation, "activate"), body, format="json")

    assert response.status_code == 400
    assert "message" in response.json()["detail"]


def test_activating_a_streaming_reply_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner)
    question = Message.objects.create(conversation=conversation, role="user", content="Q")
    row = Message.objects.create(
        conversation=conversation,
        role="assistant",
        status=Message.Status.STREAMING,
        lease_renewed_at=timezone.now(),
        reply_to=question,
        version_group=question.pk,
        is_active=False,
    )

    response = api.post(url(conversation, "activate"), {"message": str(row.pk)}, format="json")

    assert assert_409(response)
    row.refresh_from_db()
    assert not row.is_active


# --- 8. edit -------------------------------------------------------------------------------------


def test_edit_replaces_the_last_message_with_a_new_version(api, owner, fake_engine):
    conversation = make_conversation(owner, system_prompt="")
    old = post(api, conversation, "old text")
    fake_engine.calls.clear()

    response = api.post(url(conversation, "edit"), {"content": "new text"}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    question = body["user_message"]
    assert question["content"] == "new text"
    assert (question["version"], question["versions"]) == (2, 2)
    assert question["version_group"] == old["user_message"]["version_group"]
    assert body["reply"]["content"] == "Echo: new text"
    assert body["reply"]["reply_to"] == question["id"]
    assert fake_engine.calls == [[{"role": "user", "content": "new text"}]]

    assert [m["content"] for m in listed(api, conversation)] == ["new text", "Echo: new text"]
    everything = {m["id"]: m for m in listed(api, conversation, "all")}
    assert len(everything) == 4
    assert everything[old["user_message"]["id"]]["is_active"] is False
    assert everything[old["user_message"]["id"]]["version"] == 1
    assert everything[old["reply"]["id"]]["content"] == "Echo: old text"

    # Switching back to the old question brings its old reply back with it.
    response = api.post(
        url(conversation, "activate"), {"message": old["user_message"]["id"]}, format="json"
    )
    assert response.status_code == 200, response.content
    assert Message.objects.get(pk=old["reply"]["id"]).is_active
    assert [m["content"] for m in listed(api, conversation)] == ["old text", "Echo: old text"]

    fake_engine.calls.clear()
    post(api, conversation, "Next")
    assert fake_engine.calls[0][:2] == [
        {"role": "user", "content": "old text"},
        {"role": "assistant", "content": "Echo: old text"},
    ]


def test_edit_streams(api, owner, fake_engine):
    conversation = make_conversation(owner)
    post(api, conversation, "old text")

    response = stream_post(api, url(conversation, "edit"), {"content": "new text"})

    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events) == ["user_message", "delta", "delta", "delta", "done"]
    question, reply = events[0][1], events[-1][1]
    assert question["content"] == "new text"
    assert (question["version"], question["versions"]) == (2, 2)
    assert reply["content"] == "Echo: new text"
    assert (reply["version"], reply["versions"]) == (1, 1)


@pytest.mark.parametrize("body", [{"content": ""}, {"content": "   "}, {}, {"content": 5}])
def test_edit_validation_is_400_and_creates_nothing(api, owner, fake_engine, body):
    conversation = make_conversation(owner)
    post(api, conversation, "old text")
    before = list(conversation.messages.values_list("id", "content", "is_active"))
    fake_engine.calls.clear()

    response = api.post(url(conversation, "edit"), body, format="json")

    assert response.status_code == 400
    assert "content" in response.json()["detail"]
    assert list(conversation.messages.values_list("id", "content", "is_active")) == before
    assert fake_engine.calls == []


def test_edit_on_an_empty_conversation_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner)

    response = api.post(url(conversation, "edit"), {"content": "new text"}, format="json")

    assert assert_409(response)
    assert not conversation.messages.exists()


# --- 9. a reply still being written; interrupted replies --------------------------------------


def add_streaming_reply(conversation, **fields) -> Message:
    question = Message.objects.create(conversation=conversation, role="user", content="Q")
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="half an ans",
        status=Message.Status.STREAMING,
        reply_to=question,
        version_group=question.pk,
        **{"lease_renewed_at": timezone.now(), **fields},  # (a live writer, unless told)
    )


@pytest.mark.parametrize(
    "action, body",
    [
        ("messages", {"content": "More"}),
        ("regenerate", {}),
        ("edit", {"content": "Changed"}),
    ],
)
def test_posting_while_a_reply_is_streaming_is_409(api, owner, fake_engine, action, body):
    conversation = make_conversation(owner)
    add_streaming_reply(conversation)
    before = list(conversation.messages.values_list("id", "content", "status", "is_active"))

    response = api.post(url(conversation, action), body, format="json")

    detail = assert_409(response)
    assert "still being written" in detail
    after = list(conversation.messages.values_list("id", "content", "status", "is_active"))
    assert after == before
    assert fake_engine.calls == []


def test_streaming_request_while_a_reply_is_streaming_gets_an_error_event(api, owner, fake_engine):
    conversation = make_conversation(owner)
    add_streaming_reply(conversation)

    response = stream_post(api, url(conversation), {"content": "More"})

    assert response.status_code == 409
    assert response["Content-Type"].startswith(SSE)
    ((kind, data),) = parse_events(response.content)
    assert kind == "error"
    assert "still being written" in data["detail"]
    assert conversation.messages.count() == 2


def test_interrupt_dead_replies_marks_only_expired_leases(owner, other_user, settings):
    settings.CHATBOT_STALE_REPLY_SECONDS = 15
    expired = timezone.now() - timedelta(seconds=16)
    mine = add_streaming_reply(make_conversation(owner), lease_renewed_at=expired)
    theirs = add_streaming_reply(make_conversation(other_user), lease_renewed_at=expired)
    # Written before replies held leases.
    older = add_streaming_reply(make_conversation(other_user), lease_renewed_at=None)
    live = add_streaming_reply(
        make_conversation(owner), lease_renewed_at=timezone.now() - timedelta(seconds=14)
    )
    done = Message.objects.create(
        conversation=mine.conversation, role="assistant", content="x", status="ok"
    )
    Message.objects.filter(pk=done.pk).update(lease_renewed_at=expired)

    assert services.interrupt_dead_replies() == 3

    for row in (mine, theirs, older):
        row.refresh_from_db()
        assert row.status == Message.Status.INTERRUPTED
        assert row.content == "half an ans"
        assert "server stopped" in row.error
    for row, status in ((live, Message.Status.STREAMING), (done, Message.Status.OK)):
        row.refresh_from_db()
        assert row.status == status
    assert services.interrupt_dead_replies() == 0


def test_interrupted_and_cancelled_replies_are_in_the_context_error_replies_are_not(
    api, owner, fake_engine
):
    conversation = make_conversation(owner, system_prompt="")
    start = timezone.now() - timedelta(hours=1)
    rows = [
        ("user", "q1", "ok"),
        ("assistant", "partial one", "streaming"),  # becomes interrupted
        ("user", "q2", "ok"),
        ("assistant", "partial two", "cancelled"),
        ("user", "q3", "ok"),
        ("assistant", "partial three", "error"),
        ("user", "q4", "ok"),
        ("assistant", "", "cancelled"),  # stopped before any text
    ]
    question = None
    for i, (role, content, status) in enumerate(rows):
        message = Message.objects.create(
            conversation=conversation,
            role=role,
            content=content,
            status=status,
            error="RuntimeError: boom" if status == "error" else "",
            created_at=start + timedelta(seconds=i),
            reply_to=question if role == "assistant" else None,
            **({"version_group": question.pk} if role == "assistant" else {}),
        )
        question = message if role == "user" else None
    # The streaming reply's server died long ago: the next message marks it interrupted.
    conversation.messages.filter(status="streaming").update(
        lease_renewed_at=start - timedelta(hours=1)
    )

    post(api, conversation, "q5")

    assert fake_engine.calls == [
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "partial one"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "partial two"},
            {"role": "user", "content": "q3"},
            {"role": "user", "content": "q4"},
            {"role": "user", "content": "q5"},
        ]
    ]


# --- 10. per-conversation generation parameters -------------------------------------------------


def record_stream_params(fake_engine, monkeypatch) -> list:
    seen = []
    original = fake_engine.stream

    def stream(messages, params, **options):
        seen.append(params)
        return original(messages, params, **options)

    monkeypatch.setattr(fake_engine, "stream", stream)
    return seen


def test_patch_generation_params(api, owner):
    conversation = make_conversation(owner)
    detail = f"/api/conversations/{conversation.pk}/"

    response = api.patch(detail, {"temperature": 0.7, "max_new_tokens": 5}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["temperature"] == 0.7
    assert response.json()["max_new_tokens"] == 5
    conversation.refresh_from_db()
    assert (conversation.temperature, conversation.max_new_tokens) == (0.7, 5)

    for body in ({"temperature": 5}, {"temperature": -1}, {"max_new_tokens": 0}):
        response = api.patch(detail, body, format="json")
        assert response.status_code == 400, body
        assert next(iter(body)) in response.json()["detail"]
    conversation.refresh_from_db()
    assert (conversation.temperature, conversation.max_new_tokens) == (0.7, 5)

    response = api.patch(detail, {"temperature": None, "max_new_tokens": None}, format="json")

    assert response.status_code == 200
    assert response.json()["temperature"] is None
    assert response.json()["max_new_tokens"] is None
    conversation.refresh_from_db()
    assert (conversation.temperature, conversation.max_new_tokens) == (None, None)


def test_reply_uses_the_conversations_params(api, owner, fake_engine, monkeypatch, settings):
    seen = record_stream_params(fake_engine, monkeypatch)
    conversation = make_conversation(owner)
    api.patch(
        f"/api/conversations/{conversation.pk}/",
        {"temperature": 0.7, "max_new_tokens": 3},
        format="json",
    )

    reply = post(api, conversation, "one two three four five")["reply"]

    assert (seen[0].temperature, seen[0].max_new_tokens) == (0.7, 3)
    assert seen[0].top_p == settings.CHATBOT_TOP_P
    assert reply["content"] == "Echo: one two"  # the fake stops at max_new_tokens words
    assert reply["generation_params"]["temperature"] == 0.7
    assert reply["generation_params"]["max_new_tokens"] == 3
    stored = Message.objects.get(pk=reply["id"])
    assert stored.generation_params["temperature"] == 0.7
    assert stored.generation_params["max_new_tokens"] == 3

    # Back to the defaults.
    api.patch(
        f"/api/conversations/{conversation.pk}/",
        {"temperature": None, "max_new_tokens": None},
        format="json",
    )
    reply = post(api, conversation, "again")["reply"]
    assert reply["generation_params"]["temperature"] == settings.CHATBOT_TEMPERATURE
    assert reply["generation_params"]["max_new_tokens"] == settings.CHATBOT_MAX_NEW_TOKENS
    assert seen[1].max_new_tokens == settings.CHATBOT_MAX_NEW_TOKENS


def test_create_with_generation_params(api, owner, fake_engine, monkeypatch):
    seen = record_stream_params(fake_engine, monkeypatch)

    response = api.post("/api/conversations/", {"title": "Warm", "temperature": 1.2}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["temperature"] == 1.2
    assert response.json()["max_new_tokens"] is None
    conversation = Conversation.objects.get(pk=response.json()["id"])
    assert conversation.temperature == 1.2
    reply = post(api, conversation, "Hi")["reply"]
    assert seen[0].temperature == 1.2
    assert reply["generation_params"]["temperature"] == 1.2


def test_create_with_invalid_generation_params_is_400(api, owner):
    response = api.post("/api/conversations/", {"temperature": 2.5}, format="json")

    assert response.status_code == 400
    assert not Conversation.objects.exists()


# --- 11. titles ----------------------------------------------------------------------------------


QUESTION = "What is the capital of France?"


@pytest.fixture
def titles(settings, fake_engine):
    settings.CHATBOT_AUTO_TITLE = True
    fake_engine.replies = ["The capital is Paris.", "Capital of France"]
    return fake_engine


def test_the_model_names_the_conversation_after_the_first_exchange(api, owner, titles):
    conversation = make_conversation(owner, title="")

    body = post(api, conversation, QUESTION)

    assert body["reply"]["content"] == "The capital is Paris."
    conversation.refresh_from_db()
    assert conversation.title == "Capital of France"
    response = api.get(f"/api/conversations/{conversation.pk}/")
    assert response.json()["title"] == "Capital of France"
    assert len(titles.calls) == 2
    assert QUESTION in titles.calls[1][-1]["content"]
    # The title prompt is no message of the conversation.
    assert conversation.messages.count() == 2


def test_streamed_title_event_follows_done(api, owner, titles):
    conversation = make_conversation(owner, title="")

    response = stream_post(api, url(conversation), {"content": QUESTION})

    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events)[-2:] == ["done", "title"]
    assert events[-1][1] == {"title": "Capital of France"}
    assert events[-2][1]["content"] == "The capital is Paris."
    conversation.refresh_from_db()
    assert conversation.title == "Capital of France"


def test_a_new_conversation_from_start_message_gets_a_model_title(api, owner, titles):
    response = api.post("/api/messages/", {"content": QUESTION}, format="json")

    assert response.status_code == 201
    assert Conversation.objects.get(pk=response.json()["conversation"]).title == (
        "Capital of France"
    )


@pytest.mark.parametrize(
    "model_title",
    [
        " ".join(["word"] * 20) + ".",
        "A title that is way too long to be a title",
        "",
        "\n",
    ],
)
def test_a_bad_model_title_keeps_the_fallback(api, owner, titles, model_title):
    titles.replies = ["The capital is Paris.", model_title]
    conversation = make_conversation(owner, title="")

    post(api, conversation, QUESTION)

    conversation.refresh_from_db()
    assert conversation.title == QUESTION
    assert len(titles.calls) == 2


def test_a_title_cut_off_by_the_length_limit_keeps_the_fallback(api, owner, titles, monkeypatch):
    asked = []

    def generate(messages, params, **options):
        asked.append(params)
        return Generation("Capital of France", 10, 16, 1, 2, finish_reason="length")

    monkeypatch.setattr(titles, "generate", generate)
    conversation = make_conversation(owner, title="")

    post(api, conversation, QUESTION)

    conversation.refresh_from_db()
    assert conversation.title == QUESTION
    assert len(asked) == 1


def test_a_failing_title_keeps_the_fallback_and_the_reply(api, owner, titles, monkeypatch):
    def generate(messages, params, **options):
        raise RuntimeError("no title today")

    monkeypatch.setattr(titles, "generate", generate)
    conversation = make_conversation(owner, title="")

    body = post(api, conversation, QUESTION)

    assert body["reply"]["status"] == "ok"
    conversation.refresh_from_db()
    assert conversation.title == QUESTION


def test_a_conversation_renamed_before_the_first_message_keeps_its_name(api, owner, titles):
    conversation = make_conversation(owner, title="")
    response = api.patch(
        f"/api/conversations/{conversation.pk}/", {"title": "My trip"}, format="json"
    )
    assert response.status_code == 200

    post(api, conversation, QUESTION)

    conversation.refresh_from_db()
    assert conversation.title == "My trip"
    assert len(titles.calls) == 1  # no title was asked for


def test_no_title_attempt_after_the_second_exchange(api, owner, titles):
    conversation = make_conversation(owner, title="")
    post(api, conversation, QUESTION)
    assert len(titles.calls) == 2

    titles.replies = ["Rome is in Italy", "Italian capital"]
    post(api, conversation, "And Italy?")

    assert len(titles.calls) == 3
    conversation.refresh_from_db()
    assert conversation.title == "Capital of France"


def test_no_title_after_a_failed_first_reply(api, owner, titles):
    titles.fail_with = RuntimeError("boom")
    conversation = make_conversation(owner, title="")

    response = api.post(url(conversation), {"content": QUESTION}, format="json")

    assert response.status_code == 503
    assert len(titles.calls) == 1
    conversation.refresh_from_db()
    assert conversation.title == QUESTION


def test_no_title_when_auto_titles_are_off(api, owner, fake_engine):
    fake_engine.replies = ["The capital is Paris.", "Capital of France"]
    conversation = make_conversation(owner, title="")

    post(api, conversation, QUESTION)

    conversation.refresh_from_db()
    assert conversation.title == QUESTION
    assert len(fake_engine.calls) == 1


# --- 12. schema ----------------------------------------------------------------------------------


def test_schema_validates_and_lists_the_new_actions(tmp_path):
    path = tmp_path / "schema.yml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))

    paths = yaml.safe_load(path.read_text())["paths"]
    for action in ("stop", "regenerate", "edit", "activate"):
        assert "post" in paths[f"/api/conversations/{{id}}/{action}/"], action
    messages = paths["/api/conversations/{id}/messages/"]
    assert {"get", "post"} <= set(messages)
    assert any(p["name"] == "include" for p in messages["get"].get("parameters", []))


def test_start_message_endpoint_streams_and_names_the_new_conversation(api, owner, fake_engine):
    response = api.post(
        "/api/messages/",
        {"content": "hello there"},
        format="json",
        HTTP_ACCEPT="text/event-stream",
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    events = parse_events(b"".join(response.streaming_content))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "user_message" and kinds[-1] == "done"
    conversation = Conversation.objects.get(owner=owner)
    assert events[0][1]["conversation"] == str(conversation.pk)
    assert events[-1][1]["content"] == "Echo: hello there"
    assert conversation.messages.count() == 2


def test_start_message_endpoint_streams_into_an_existing_conversation(api, owner, fake_engine):
    conversation = make_conversation(owner)
    response = api.post(
        "/api/messages/",
        {"content": "again", "conversation": str(conversation.pk), "stream": True},
        format="json",
    )
    events = parse_events(b"".join(response.streaming_content))
    assert events[0][1]["conversation"] == str(conversation.pk)
    assert events[-1][0] == "done"
    assert conversation.messages.count() == 2
