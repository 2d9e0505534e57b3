"""Thumbs up or down, with an optional comment, on any reply: from the thread page (a plain
form) and the API; the message's owner only; bad input gets a clear error and changes nothing."""

import pytest
from django.test import Client
from django.urls import reverse

from conversations.models import Message
from tests.factories import assert_detail, make_conversation, messages_url

pytestmark = pytest.mark.django_db


@pytest.fixture
def reply(api, owner, fake_engine) -> Message:
    conversation = make_conversation(owner, "Chat")
    response = api.post(messages_url(conversation), {"content": "Hello"}, format="json")
    return Message.objects.get(pk=response.json()["reply"]["id"])


def feedback_url(reply) -> str:
    return f"/api/conversations/{reply.conversation_id}/messages/{reply.pk}/feedback/"


def page_url(reply) -> str:
    return reverse("conversations:feedback", args=[reply.conversation_id, reply.pk])


def test_the_api_rates_a_reply_and_takes_it_back(api, reply):
    response = api.post(
        feedback_url(reply), {"rating": "up", "feedback": " Clear. "}, format="json"
    )

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(reply.pk)
    assert body["rating"] == "up" and body["feedback"] == "Clear."
    reply.refresh_from_db()
    assert reply.rating == Message.Rating.UP and reply.rated_at is not None
    listed = api.get(messages_url(reply.conversation)).json()["results"]
    assert [m.get("rating") for m in listed] == [None, "up"]
    assert "rating" not in listed[0]  # user messages carry no feedback fields

    assert api.post(feedback_url(reply), {"rating": "down"}, format="json").json()["rating"] == (
        "down"
    )
    reply.refresh_from_db()
    assert reply.rating == Message.Rating.DOWN and reply.feedback is None

    cleared = api.post(feedback_url(reply), {"rating": None, "feedback": "x"}, format="json")
    assert cleared.status_code == 200 and cleared.json()["rating"] is None
    reply.refresh_from_db()
    assert (reply.rating, reply.feedback, reply.rated_at) == (None, None, None)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"rating": "sideways"}, '"up", "down" or null'),
        ({}, "rating"),
        ({"rating": "up", "feedback": "x" * 2001}, "2000 characters"),
    ],
)
def test_bad_feedback_is_refused_with_a_clear_error_and_changes_nothing(api, reply, body, said):
    api.post(feedback_url(reply), {"rating": "up", "feedback": "kept"}, format="json")

    response = api.post(feedback_url(reply), body, format="json")

    assert said in assert_detail(response, 400)
    reply.refresh_from_db()
    assert (reply.rating, reply.feedback) == (Message.Rating.UP, "kept")


def test_only_replies_of_ones_own_conversations_are_rated(api, other_api, reply):
    question = reply.reply_to
    assert api.post(feedback_url(question), {"rating": "up"}, format="json").status_code == 404
    assert other_api.post(feedback_url(reply), {"rating": "up"}, format="json").status_code == 404
    reply.refresh_from_db()
    assert reply.rating is None


def test_the_thread_page_rates_with_plain_forms(owner_client, other_user, reply):
    thread = owner_client.get(reply.conversation.get_absolute_url()).content.decode()
    assert f'action="{page_url(reply)}"' in thread
    assert 'aria-pressed="false"' in thread

    response = owner_client.post(page_url(reply), {"rating": "down", "feedback": "Too short."})

    assert response.status_code == 302
    assert response["Location"].endswith(f"#m-{reply.pk}")
    reply.refresh_from_db()
    assert (reply.rating, reply.feedback) == (Message.Rating.DOWN, "Too short.")
    thread = owner_client.get(reply.conversation.get_absolute_url()).content.decode()
    assert 'aria-pressed="true"' in thread and "Too short." in thread
    # The chosen thumb, pressed again, takes the rating back.
    assert 'name="rating" value="clear"' in thread
    owner_client.post(page_url(reply), {"rating": "clear"})
    reply.refresh_from_db()
    assert reply.rating is None

    page = owner_client.post(page_url(reply), {"rating": "sideways"}, follow=True)
    assert "Choose thumbs up or thumbs down." in page.content.decode()
    intruder = Client()
    intruder.force_login(other_user)
    assert intruder.post(page_url(reply), {"rating": "up"}).status_code == 404
    reply.refresh_from_db()
    assert reply.rating is None
