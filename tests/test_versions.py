"""Versions of a reply: regenerating it, editing the last message, and switching back to
an earlier version (activate)."""

import pytest

from conversations import services
from conversations.models import Message
from tests.factories import (
    add_streaming_reply,
    assert_409,
    assert_is_stream,
    kinds,
    listed,
    make_conversation,
    parse_events,
    post,
    stream_post,
    url,
)

pytestmark = pytest.mark.django_db


# --- regenerate ----------------------------------------------------------------------------------


def what_the_next_message_sends(api, conversation, fake_engine) -> list:
    """The engine's calls for a message "Next" posted now: the context the model is given."""
    fake_engine.calls.clear()
    post(api, conversation, "Next")
    return fake_engine.calls


def test_regenerate_adds_a_new_active_version_of_the_reply(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="")
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

    assert what_the_next_message_sends(api, conversation, fake_engine) == [
        [
            {"role": "user", "content": "Question"},
            {"role": "assistant", "content": "Second answer"},
            {"role": "user", "content": "Next"},
        ]
    ]


@pytest.mark.parametrize("how", ["accept", "body"])
def test_regenerate_streams(api, owner, fake_engine, how):
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")

    response = api.post(url(conversation, "regenerate"), format="json")

    assert assert_409(response)
    assert not conversation.messages.exists()
    assert fake_engine.calls == []


def test_regenerate_of_another_users_conversation_is_404(other_api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    services.post_message(conversation=conversation, content="Question")

    response = other_api.post(url(conversation, "regenerate"), format="json")

    assert response.status_code == 404
    assert conversation.messages.count() == 2


# --- activate ------------------------------------------------------------------------------------


def regenerated(api, conversation, fake_engine) -> tuple[dict, dict]:
    fake_engine.replies = ["First answer", "Second answer"]
    first = post(api, conversation, "Question")
    second = api.post(url(conversation, "regenerate"), format="json").json()
    return first, second


def activate(client, conversation, message_id):
    return client.post(url(conversation, "activate"), {"message": message_id}, format="json")


def test_activate_switches_back_to_an_earlier_reply(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="")
    first, second = regenerated(api, conversation, fake_engine)
    old_id = first["reply"]["id"]

    response = activate(api, conversation, old_id)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == old_id
    assert body["is_active"] is True
    assert (body["version"], body["versions"]) == (1, 2)
    assert Message.objects.get(pk=old_id).is_active
    assert not Message.objects.get(pk=second["reply"]["id"]).is_active
    assert [m["content"] for m in listed(api, conversation)] == ["Question", "First answer"]

    assert what_the_next_message_sends(api, conversation, fake_engine) == [
        [
            {"role": "user", "content": "Question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Next"},
        ]
    ]


def test_activate_outside_the_last_exchange_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    first, second = regenerated(api, conversation, fake_engine)
    post(api, conversation, "Another question")

    response = activate(api, conversation, first["reply"]["id"])

    assert assert_409(response)
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active
    assert Message.objects.get(pk=second["reply"]["id"]).is_active


def test_activate_a_message_of_another_conversation_is_404(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    other = make_conversation(owner, "Other")
    first, _ = regenerated(api, other, fake_engine)

    response = activate(api, conversation, first["reply"]["id"])

    assert response.status_code == 404
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active


def test_activate_in_another_users_conversation_is_404(api, other_api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    first, _ = regenerated(api, conversation, fake_engine)

    response = activate(other_api, conversation, first["reply"]["id"])

    assert response.status_code == 404
    assert not Message.objects.get(pk=first["reply"]["id"]).is_active


@pytest.mark.parametrize(
    "body", [{"message": "not-a-uuid"}, {"message": "1234"}, {"message": None}, {}]
)
def test_activate_with_a_malformed_id_is_400(api, owner, fake_engine, body):
    conversation = make_conversation(owner, "Chat")
    post(api, conversation, "Question")

    response = api.post(url(conversation, "activate"), body, format="json")

    assert response.status_code == 400
    assert "message" in response.json()["detail"]


def test_activating_a_streaming_reply_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    row = add_streaming_reply(conversation, content="", is_active=False)

    response = activate(api, conversation, str(row.pk))

    assert assert_409(response)
    row.refresh_from_db()
    assert not row.is_active


# --- edit ----------------------------------------------------------------------------------------


def test_edit_replaces_the_last_message_with_a_new_version(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="")
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
    response = activate(api, conversation, old["user_message"]["id"])
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
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
    post(api, conversation, "old text")
    before = list(conversation.messages.values_list("id", "content", "is_active"))
    fake_engine.calls.clear()

    response = api.post(url(conversation, "edit"), body, format="json")

    assert response.status_code == 400
    assert "content" in response.json()["detail"]
    assert list(conversation.messages.values_list("id", "content", "is_active")) == before
    assert fake_engine.calls == []


def test_edit_on_an_empty_conversation_is_409(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")

    response = api.post(url(conversation, "edit"), {"content": "new text"}, format="json")

    assert assert_409(response)
    assert not conversation.messages.exists()
