"""Rate limits: messages per user (API and pages), sign-in attempts per client address. A
refused request gets 429 with Retry-After, and stores nothing."""

import pytest

from conversations.models import Conversation, Message
from tests.conftest import PASSWORD
from tests.test_api import assert_detail, make_conversation, messages_url

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_per_minute(settings):
    settings.CHATBOT_MESSAGES_PER_MINUTE = 2
    settings.CHATBOT_LOGINS_PER_MINUTE = 2


def assert_retry_after(response):
    assert 1 <= int(response["Retry-After"]) <= 60


def test_posting_messages_is_limited_per_user(
    api, other_api, owner, other_user, fake_engine, two_per_minute
):
    mine = make_conversation(owner, "Mine")
    for text in ("one", "two"):
        assert api.post(messages_url(mine), {"content": text}, format="json").status_code == 201
    stored = Message.objects.count()

    refused = api.post(messages_url(mine), {"content": "three"}, format="json")
    assert "throttled" in assert_detail(refused, 429).lower()
    assert_retry_after(refused)
    assert Message.objects.count() == stored
    assert api.post("/api/messages/", {"content": "new"}, format="json").status_code == 429
    assert api.post(f"/api/conversations/{mine.pk}/regenerate/").status_code == 429
    assert Conversation.objects.count() == 1

    # Reading is not limited, and another user has a budget of their own.
    assert api.get(messages_url(mine)).status_code == 200
    theirs = make_conversation(other_user, "Theirs")
    assert other_api.post(messages_url(theirs), {"content": "hi"}, format="json").status_code == 201


def test_no_limit_when_the_setting_is_0(api, owner, fake_engine, settings):
    settings.CHATBOT_MESSAGES_PER_MINUTE = 0
    conversation = make_conversation(owner, "Chat")
    for i in range(5):
        response = api.post(messages_url(conversation), {"content": f"m{i}"}, format="json")
        assert response.status_code == 201


def test_api_token_attempts_are_limited(anon_api, owner, two_per_minute):
    for _ in range(2):
        wrong = anon_api.post("/api/token/", {"username": owner.username, "password": "nope"})
        assert wrong.status_code == 400
    refused = anon_api.post("/api/token/", {"username": owner.username, "password": PASSWORD})
    assert_detail(refused, 429)
    assert_retry_after(refused)


def test_login_page_attempts_are_limited(client, owner, two_per_minute):
    for _ in range(2):
        page = client.post("/accounts/login/", {"username": owner.username, "password": "nope"})
        assert page.status_code == 200  # the form again, with its error
    refused = client.post("/accounts/login/", {"username": owner.username, "password": PASSWORD})
    assert refused.status_code == 429
    assert_retry_after(refused)
    assert b"Too many requests" in refused.content
    assert "_auth_user_id" not in client.session
    assert client.get("/accounts/login/").status_code == 200, "showing the form is not limited"


def test_sending_from_the_pages_is_limited(client, owner, fake_engine, two_per_minute):
    client.force_login(owner)
    conversation = make_conversation(owner, "Chat")
    url = f"/c/{conversation.pk}/"
    for text in ("one", "two"):
        assert client.post(url, {"content": text}).status_code == 302
    stored = Message.objects.count()

    refused = client.post(url, {"content": "three"})
    assert refused.status_code == 429
    assert_retry_after(refused)
    assert b"Please wait" in refused.content
    assert Message.objects.count() == stored
    assert client.post("/new/", {"content": "new chat"}).status_code == 429
    assert Conversation.objects.count() == 1
    assert client.get(url).status_code == 200
