"""Per-conversation generation parameters: set at creation or later, checked, and used for
the conversation's replies."""

import pytest

from conversations.models import Conversation, Message
from tests.factories import (
    make_conversation,
    post,
)

pytestmark = pytest.mark.django_db


def record_stream_params(fake_engine, monkeypatch) -> list:
    seen = []
    original = fake_engine.stream

    def stream(messages, params, **options):
        seen.append(params)
        return original(messages, params, **options)

    monkeypatch.setattr(fake_engine, "stream", stream)
    return seen


def test_patch_generation_params(api, owner):
    conversation = make_conversation(owner, "Chat")
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
    conversation = make_conversation(owner, "Chat")
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
