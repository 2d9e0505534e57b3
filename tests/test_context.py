"""What the model is given for a reply: the earlier turns and the system prompt, which
replies count as turns, and what is dropped or refused when the history does not fit."""

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import Message
from tests.factories import assert_detail, make_conversation, messages_url, post

pytestmark = pytest.mark.django_db


# --- the turns sent ------------------------------------------------------------------------------


def test_second_message_sees_the_earlier_turns(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="Be brief.")

    api.post(messages_url(conversation), {"content": "My name is Ada."}, format="json")
    response = api.post(messages_url(conversation), {"content": "What is my name?"}, format="json")

    assert response.status_code == 201
    assert response.json()["reply"]["context_turns"] == 2
    assert len(fake_engine.calls) == 2
    assert fake_engine.calls[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
    ]
    assert fake_engine.calls[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Echo: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    contents = [m["content"] for m in api.get(messages_url(conversation)).json()["results"]]
    assert contents == [
        "My name is Ada.",
        "Echo: My name is Ada.",
        "What is my name?",
        "Echo: What is my name?",
    ]


def test_conversation_without_system_prompt_sends_none(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="")

    api.post(messages_url(conversation), {"content": "Hi"}, format="json")

    assert fake_engine.calls == [[{"role": "user", "content": "Hi"}]]


def test_interrupted_and_cancelled_replies_are_in_the_context_error_replies_are_not(
    api, owner, fake_engine
):
    conversation = make_conversation(owner, "Chat", system_prompt="")
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


# --- a history longer than the context window ----------------------------------------------------


def test_message_too_long_for_the_context_is_422(api, owner, small_engine):
    conversation = make_conversation(owner, "Chat")
    long_message = " ".join(["word"] * 40)

    response = api.post(messages_url(conversation), {"content": long_message}, format="json")

    detail = assert_detail(response, 422)
    assert "30" in detail  # the budget
    body = response.json()
    assert body["user_message"]["content"] == long_message
    assert body["reply"]["status"] == "error"
    assert Message.objects.get(pk=body["user_message"]["id"]).content == long_message
    assert Message.objects.get(pk=body["reply"]["id"]).status == "error"
    assert small_engine.calls == []


def test_old_turns_are_dropped_when_history_does_not_fit(api, owner, small_engine):
    conversation = make_conversation(owner, "Chat")
    first = "one two three four five six seven eight"  # 10 tokens; its echo takes 11
    second = "nine ten eleven twelve thirteen fourteen fifteen sixteen"

    assert (
        api.post(messages_url(conversation), {"content": first}, format="json").status_code == 201
    )
    response = api.post(messages_url(conversation), {"content": second}, format="json")

    assert response.status_code == 201
    assert response.json()["reply"]["context_turns"] == 0
    assert small_engine.calls[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": second},
    ]
