"""One user cannot hold the model for everyone: a cap on each user's replies in flight, a
ceiling on the reply budget, and the model thread admitting waiting replies user by user."""

import re

import pytest

from conversations import services
from conversations.models import Conversation, Message
from tests.factories import assert_detail, close_stream, make_conversation, messages_url

pytestmark = pytest.mark.django_db

SSE = "text/event-stream"


def open_stream(api, conversation):
    """A reply reserved and not yet read: it counts as being written until the stream closes."""
    response = api.post(
        messages_url(conversation), {"content": "Go"}, format="json", HTTP_ACCEPT=SSE
    )
    assert response.status_code == 200
    return response


# --- replies in flight per user -----------------------------------------------------------------


def test_a_user_with_replies_in_flight_at_the_cap_gets_429_and_others_do_not(
    api, other_api, owner, other_user, fake_engine, settings
):
    settings.CHATBOT_REPLIES_PER_USER = 2
    streams = [open_stream(api, make_conversation(owner, f"Flood {i}")) for i in range(2)]
    third = make_conversation(owner, "Third")
    stored = Message.objects.count()

    refused = api.post(messages_url(third), {"content": "One more"}, format="json")

    detail = assert_detail(refused, 429)
    assert "2 replies being written" in detail and "Wait for one to finish" in detail
    assert Message.objects.count() == stored  # nothing stored for the refused message
    started = api.post("/api/messages/", {"content": "A new chat"}, format="json")
    assert_detail(started, 429)
    assert Conversation.objects.filter(owner=owner).count() == 3  # no empty conversation left
    # Another user is not held back by this one.
    theirs = make_conversation(other_user, "Theirs")
    answered = other_api.post(messages_url(theirs), {"content": "Hi"}, format="json")
    assert answered.status_code == 201

    close_stream(streams[0])  # one of the replies ends: a place is free again

    assert api.post(messages_url(third), {"content": "Now"}, format="json").status_code == 201


def test_no_cap_on_replies_in_flight_when_the_setting_is_0(api, owner, fake_engine, settings):
    settings.CHATBOT_REPLIES_PER_USER = 0
    for i in range(3):
        open_stream(api, make_conversation(owner, f"Chat {i}"))
    assert Message.objects.filter(status=Message.Status.STREAMING).count() == 3


def test_a_dead_reply_does_not_count_against_the_cap(api, owner, fake_engine, settings):
    settings.CHATBOT_REPLIES_PER_USER = 1
    open_stream(api, make_conversation(owner, "Dead"))
    Message.objects.filter(status=Message.Status.STREAMING).update(lease_renewed_at=None)

    response = api.post(
        messages_url(make_conversation(owner, "Next")), {"content": "Hi"}, format="json"
    )

    assert response.status_code == 201


# --- the reply budget's ceiling ------------------------------------------------------------------


def test_a_reply_budget_above_the_ceiling_is_refused(api, owner, settings):
    settings.CHATBOT_MAX_NEW_TOKENS_LIMIT = 100
    conversation = make_conversation(owner, "Chat")

    created = api.post("/api/conversations/", {"max_new_tokens": 101}, format="json")
    patched = api.patch(
        f"/api/conversations/{conversation.pk}/", {"max_new_tokens": 4096}, format="json"
    )

    assert "at most 100 tokens" in assert_detail(created, 400)
    assert "max_new_tokens" in created.json()["errors"]
    assert "at most 100 tokens" in assert_detail(patched, 400)
    conversation.refresh_from_db()
    assert conversation.max_new_tokens is None
    assert Conversation.objects.count() == 1
    ok = api.patch(f"/api/conversations/{conversation.pk}/", {"max_new_tokens": 100}, format="json")
    assert ok.status_code == 200


def test_the_settings_page_refuses_a_budget_above_the_ceiling(client, owner, settings):
    settings.CHATBOT_MAX_NEW_TOKENS_LIMIT = 100
    conversation = make_conversation(owner, "Chat")
    client.force_login(owner)

    response = client.post(
        f"/c/{conversation.pk}/settings/", {"title": "Chat", "max_new_tokens": "500"}
    )

    assert response.status_code == 400
    assert "at most 100 tokens" in response.content.decode()
    conversation.refresh_from_db()
    assert conversation.max_new_tokens is None


@pytest.mark.parametrize(("limit", "ceiling"), [(100, 100), (10_000, 4096)])
def test_the_schema_and_the_settings_page_state_the_same_ceiling(
    api, client, owner, settings, limit, ceiling
):
    """The server's limit, or the field's own range where the limit is higher."""
    settings.CHATBOT_MAX_NEW_TOKENS_LIMIT = limit
    conversation = make_conversation(owner, "Chat")
    client.force_login(owner)

    schema = api.get("/api/schema/", {"format": "json"}).json()
    page = client.get(f"/c/{conversation.pk}/settings/").content.decode()

    budget = schema["components"]["schemas"]["ConversationRequest"]["properties"]["max_new_tokens"]
    assert budget["maximum"] == ceiling
    assert re.search(rf'name="max_new_tokens" min="1" max="{ceiling}"', page)


def test_a_stored_budget_above_the_ceiling_is_cut_to_it(api, owner, fake_engine, settings):
    """A conversation whose budget was set (or imported) before the ceiling was lowered."""
    settings.CHATBOT_MAX_NEW_TOKENS_LIMIT = 3
    conversation = make_conversation(owner, "Chat")
    Conversation.objects.filter(pk=conversation.pk).update(max_new_tokens=4096)

    reply = api.post(
        messages_url(conversation), {"content": "one two three four five"}, format="json"
    )

    assert reply.status_code == 201
    assert reply.json()["reply"]["generation_params"]["max_new_tokens"] == 3
    assert reply.json()["reply"]["content"] == "Echo: one two"  # the fake writes a word a token
    conversation.refresh_from_db()
    assert services.generation_params(conversation).max_new_tokens == 3


# --- the model thread lets waiting replies in user by user ---------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_causal

    return build_tiny_causal(tmp_path_factory.mktemp("tiny-fair"), context_window=256)


def test_waiting_replies_are_let_in_user_by_user_not_first_come(tiny_dir, tmp_path):
    """One reply at a time; a flooder's four replies are queued before two of Bob's and one of
    Carol's. The others do not wait for all of the flooder's: users take turns."""
    from conversations.llm.engine import Engine
    from conversations.llm.events import ReplyEnded
    from conversations.llm.reply_request import ReplyRequest
    from tests.engine_helpers import chat, submit_together

    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path, weights="fp32", max_batch=1)
    engine.load()
    names = ["flood-1", "flood-2", "flood-3", "flood-4", "bob-1", "bob-2", "carol-1"]
    requests = {
        name: ReplyRequest(
            prompt=engine.encode(chat(f"hello {name}")),
            max_new_tokens=4,
            stop_ids=frozenset(),
            owner=name.split("-")[0],
        )
        for name in names
    }
    submit_together(engine, list(requests.values()))  # all waiting when the model looks

    # One reply at a time: each ends before the next is let in, so their ends give the order.
    ended = {name: r.events.queue[-1] for name, r in requests.items()}
    assert all(isinstance(event, ReplyEnded) for event in ended.values())
    order = sorted(names, key=lambda name: ended[name].at)
    assert order == ["flood-1", "bob-1", "carol-1", "flood-2", "bob-2", "flood-3", "flood-4"]


def test_a_new_chat_from_the_pages_at_the_cap_is_refused_with_a_message(
    client, api, owner, fake_engine, settings
):
    settings.CHATBOT_REPLIES_PER_USER = 1
    open_stream(api, make_conversation(owner, "Busy"))
    client.force_login(owner)

    response = client.post("/new/", {"content": "Hello", "system_prompt": ""}, follow=True)

    assert response.status_code == 200
    assert "replies being written" in response.content.decode()
    assert Conversation.objects.filter(owner=owner).count() == 1
