"""Streaming replies (server-sent events): the events sent, the reply saved while it is
written, stopping it, a client that goes away, failures mid-stream, and a conversation whose
reply is still being written."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import services
from conversations.api.serializers import MessageSerializer, message_data
from conversations.leases import keeper
from conversations.models import Conversation, Message
from tests.factories import (
    REPLY_STATS,
    SCRIPTED,
    SSE,
    EventReader,
    add_streaming_reply,
    assert_409,
    assert_is_stream,
    close_stream,
    kinds,
    make_conversation,
    parse_events,
    post,
    stream_post,
    stream_saving_every_piece,
    url,
)

pytestmark = pytest.mark.django_db


# --- 1. SSE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["accept", "body"])
def test_streamed_message_sends_user_message_deltas_done(api, owner, fake_engine, how):
    conversation = make_conversation(owner, "Chat")

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
    counted = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert not [sql for sql in counted if "conversations_message" in sql], counted
    assert done["reply_to"] == user_message["id"]

    reply = Message.objects.get(pk=done["id"])
    assert reply.status == Message.Status.OK
    assert reply.content == text
    assert str(reply.reply_to_id) == user_message["id"]
    assert reply.completion_tokens == 4
    assert reply.generation_params["finish_reason"] == "stop"
    assert conversation.messages.count() == 2


def test_message_data_is_what_a_serializer_of_its_own_gives(owner):
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
    fake_engine.replies = ["Some **bold** words"]

    response = stream_post(api, url(conversation), {"content": "Hi"})

    done = parse_events(b"".join(response.streaming_content))[-1][1]
    assert done["content"] == "Some **bold** words"
    assert "<strong>bold</strong>" in done["html"]


def test_json_answer_is_not_a_stream(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")

    response = api.post(url(conversation), {"content": "Hi", "stream": False}, format="json")

    assert response.status_code == 201
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["reply"]["content"] == "Echo: Hi"


# --- 2. the row is reserved with the question, and has text from the first token -----------------


def test_reply_row_is_reserved_with_the_question_and_has_text_from_the_first_token(
    api, owner, fake_engine
):
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
    post(api, conversation, "Hi")

    response = api.post(url(conversation, "stop"), format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["stopped"] is False
    assert "nothing" in body["detail"].lower()
    assert conversation.messages.get(role="assistant").status == Message.Status.OK


def test_stop_marks_a_reply_written_by_another_process(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    row = add_streaming_reply(conversation, content="partial")

    response = api.post(url(conversation, "stop"), format="json")

    assert response.json()["stopped"] is True
    row.refresh_from_db()
    assert row.status == Message.Status.CANCELLED
    assert row.content == "partial"


def test_stop_of_another_users_conversation_is_404(api, other_api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")

    response = anon_api.post(url(conversation, "stop"), format="json")

    assert response.status_code == 401


# --- 4. the client goes away ---------------------------------------------------------------------


def test_closing_the_stream_early_saves_the_partial_reply_as_cancelled(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    fake_engine.replies = [SCRIPTED]
    response = stream_post(api, url(conversation), {"content": "Count"})
    reader = EventReader(response)
    reader.until("delta")
    reader.next()

    close_stream(response)

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
    conversation = make_conversation(owner, "Chat")
    response = stream_post(api, url(conversation), {"content": "Hello"})
    reader = EventReader(response)
    for _ in range(events_read):
        assert reader.next()[0] == "user_message"

    close_stream(response)

    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.CANCELLED and reply.content == ""
    assert fake_engine.calls == []  # the model was never asked
    post(api, conversation, "Next")


# --- 5. failures ---------------------------------------------------------------------------------


def test_failure_mid_stream_sends_an_error_event_and_keeps_the_rows(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="Sys.")
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
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
    fake_engine.fail_with = RuntimeError("early")

    response = stream_post(api, url(conversation), {"content": "Hi"})

    events = parse_events(b"".join(response.streaming_content))
    assert kinds(events) == ["user_message", "error"]
    assert "early" in events[-1][1]["detail"]
    reply = conversation.messages.get(role="assistant")
    assert reply.status == Message.Status.ERROR
    assert reply.content == ""


# --- 6. a reply still being written --------------------------------------------------------------


@pytest.mark.parametrize(
    "action, body",
    [
        ("messages", {"content": "More"}),
        ("regenerate", {}),
        ("edit", {"content": "Changed"}),
    ],
)
def test_posting_while_a_reply_is_streaming_is_409(api, owner, fake_engine, action, body):
    conversation = make_conversation(owner, "Chat")
    add_streaming_reply(conversation)
    before = list(conversation.messages.values_list("id", "content", "status", "is_active"))

    response = api.post(url(conversation, action), body, format="json")

    detail = assert_409(response)
    assert "still being written" in detail
    after = list(conversation.messages.values_list("id", "content", "status", "is_active"))
    assert after == before
    assert fake_engine.calls == []


def test_streaming_request_while_a_reply_is_streaming_gets_an_error_event(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
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
    mine = add_streaming_reply(make_conversation(owner, "Chat"), lease_renewed_at=expired)
    theirs = add_streaming_reply(make_conversation(other_user, "Chat"), lease_renewed_at=expired)
    # Written before replies held leases.
    older = add_streaming_reply(make_conversation(other_user, "Chat"), lease_renewed_at=None)
    live = add_streaming_reply(
        make_conversation(owner, "Chat"), lease_renewed_at=timezone.now() - timedelta(seconds=14)
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


# --- 7. /api/messages/ ---------------------------------------------------------------------------


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
    conversation = make_conversation(owner, "Chat")
    response = api.post(
        "/api/messages/",
        {"content": "again", "conversation": str(conversation.pk), "stream": True},
        format="json",
    )
    events = parse_events(b"".join(response.streaming_content))
    assert events[0][1]["conversation"] == str(conversation.pk)
    assert events[-1][0] == "done"
    assert conversation.messages.count() == 2
