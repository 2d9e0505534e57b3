"""Titles the model writes for a conversation after its first exchange, and the fallback
kept when it cannot."""

import pytest

from conversations.llm.engine import Generation
from conversations.models import Conversation
from tests.factories import kinds, make_conversation, parse_events, post, stream_post, url

pytestmark = pytest.mark.django_db


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
