"""Why did it answer that? Each reply records which stored messages went into its context (and
how many older ones were dropped for room); the thread page's "saw N earlier messages" opens that
record, and the API gives it. The record outlives later edits and regenerations."""

import pytest
from django.test import Client
from django.urls import reverse

from conversations.models import Message
from tests.factories import make_conversation, messages_url

pytestmark = pytest.mark.django_db


def context_url(conversation, reply) -> str:
    return f"/api/conversations/{conversation.pk}/messages/{reply.pk}/context/"


def page_url(conversation, reply) -> str:
    return reverse("conversations:context", args=[conversation.pk, reply.pk])


def say(api, conversation, content) -> Message:
    response = api.post(messages_url(conversation), {"content": content}, format="json")
    assert response.status_code == 201, response.content
    return Message.objects.get(pk=response.json()["reply"]["id"])


def test_a_reply_records_the_system_prompt_and_the_messages_it_saw(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="Be brief.")
    first = say(api, conversation, "My name is Ada.")
    second = say(api, conversation, "What is my name?")

    assert first.context == {"system_prompt": "Be brief.", "messages": [], "dropped": 0}
    question = first.reply_to
    assert second.context == {
        "system_prompt": "Be brief.",
        "messages": [str(question.pk), str(first.pk)],
        "dropped": 0,
    }
    body = api.get(context_url(conversation, second)).json()
    assert body["recorded"] is True
    assert body["system_prompt"] == "Be brief." and body["dropped"] == 0
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "My name is Ada."),
        ("assistant", "Echo: My name is Ada."),
    ]
    assert body["question"]["content"] == "What is my name?"
    assert body["prompt_tokens"] == second.prompt_tokens


def test_turns_dropped_for_room_are_counted_and_marked_on_the_page(
    api, owner, owner_client, small_engine
):
    conversation = make_conversation(owner, "Chat")
    say(api, conversation, "one two three")
    kept_question = "four five six"
    kept = say(api, conversation, kept_question)
    last = say(api, conversation, "seven eight nine ten eleven twelve")

    # 4 (system) + 8 (the new message) + 5 + 6 (the kept turn) fit in 30; the first turn not.
    assert last.context_turns == 2
    assert last.context["dropped"] == 2
    assert last.context["messages"] == [str(kept.reply_to_id), str(kept.pk)]
    body = api.get(context_url(conversation, last)).json()
    assert [m["content"] for m in body["messages"]] == [kept_question, f"Echo: {kept_question}"]

    page = owner_client.get(page_url(conversation, last))
    assert page.status_code == 200
    html = page.content.decode()
    assert "2 older messages left out" in html
    assert "Be brief." in html and kept_question in html
    assert "one two three" not in html
    # The thread links each reply's "saw N earlier messages" to its record.
    thread = owner_client.get(conversation.get_absolute_url()).content.decode()
    assert f'href="{page_url(conversation, last)}"' in thread
    assert "saw 2 earlier messages" in thread


def test_the_record_stays_when_later_messages_are_edited_or_regenerated(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="Be brief.")
    say(api, conversation, "First question")
    second = say(api, conversation, "Second question")
    recorded = second.context

    regenerated = api.post(f"/api/conversations/{conversation.pk}/regenerate/", format="json")
    assert regenerated.status_code == 201
    edited = api.post(
        f"/api/conversations/{conversation.pk}/edit/", {"content": "Other"}, format="json"
    )
    assert edited.status_code == 201
    api.patch(f"/api/conversations/{conversation.pk}/", {"system_prompt": "Be long."})

    second.refresh_from_db()
    assert second.context == recorded
    body = api.get(context_url(conversation, second)).json()
    assert body["system_prompt"] == "Be brief."  # what it read, not what the chat says now
    assert [m["content"] for m in body["messages"]] == ["First question", "Echo: First question"]


def test_a_failed_reply_keeps_what_the_model_read(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat", system_prompt="")
    say(api, conversation, "Hello")
    fake_engine.fail_with = RuntimeError("the model fell over")
    response = api.post(messages_url(conversation), {"content": "Again"}, format="json")

    assert response.status_code == 503
    failed = Message.objects.get(pk=response.json()["reply"]["id"])
    assert failed.status == Message.Status.ERROR
    assert failed.context is not None and len(failed.context["messages"]) == 2


def test_a_deleted_message_shows_as_such_and_an_old_reply_has_no_record(
    api, owner, owner_client, fake_engine
):
    conversation = make_conversation(owner, "Chat")
    first = say(api, conversation, "Hello")
    second = say(api, conversation, "Again")
    Message.objects.filter(pk=first.pk).delete()
    body = api.get(context_url(conversation, second)).json()
    assert [m["content"] for m in body["messages"]] == ["Hello", None]
    assert (
        "A message deleted since."
        in owner_client.get(page_url(conversation, second)).content.decode()
    )

    Message.objects.filter(pk=second.pk).update(context=None)  # as written before records
    body = api.get(context_url(conversation, second)).json()
    assert body["recorded"] is False and body["messages"] == []
    page = owner_client.get(page_url(conversation, second)).content.decode()
    assert "kept no record" in page


def test_only_the_owner_sees_a_replys_context(
    api, other_api, owner, owner_client, other_user, fake_engine
):
    conversation = make_conversation(owner, "Chat")
    reply = say(api, conversation, "Secret")
    question = reply.reply_to

    assert other_api.get(context_url(conversation, reply)).status_code == 404
    intruder = Client()
    intruder.force_login(other_user)
    assert intruder.get(page_url(conversation, reply)).status_code == 404
    assert owner_client.get(page_url(conversation, reply)).status_code == 200
    # A user message has no context of its own.
    assert api.get(context_url(conversation, question)).status_code == 404
    assert owner_client.get(page_url(conversation, question)).status_code == 404
    assert (
        api.get(f"/api/conversations/{conversation.pk}/messages/nope/context/").status_code == 404
    )
