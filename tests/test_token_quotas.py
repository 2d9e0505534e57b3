"""Per-user daily token quotas: unlimited by default; the server's default or a user's own quota
(set in the admin) refuses new replies with 429 once today's replies have spent it, saying when
it resets; yesterday's tokens do not count; users see their usage on a page and in the API."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import TokenQuota
from conversations import quotas, services
from conversations.models import Message
from tests.factories import assert_detail, make_conversation, messages_url

pytestmark = pytest.mark.django_db


def spend(owner, tokens: int, *, when=None) -> None:
    """A reply of `owner`'s that took `tokens` (prompt and reply), written `when` (now)."""
    conversation = make_conversation(owner, "Spent")
    Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        content="spent",
        prompt_tokens=tokens - tokens // 2,
        completion_tokens=tokens // 2,
        created_at=when or timezone.now(),
    )


def test_without_a_quota_nothing_is_refused(api, owner, fake_engine):
    spend(owner, 10_000_000)
    conversation = make_conversation(owner, "Chat")
    assert api.post(messages_url(conversation), {"content": "Hi"}, format="json").status_code == 201
    body = api.get("/api/usage/").json()
    assert body["tokens_per_day"] is None and body["tokens_left"] is None
    assert body["tokens_today"] > 10_000_000


def test_over_the_servers_quota_a_message_gets_429_with_when_it_resets(
    api, owner, other_user, settings, fake_engine
):
    settings.CHATBOT_TOKENS_PER_DAY = 100
    conversation = make_conversation(owner, "Chat")
    assert api.post(messages_url(conversation), {"content": "Hi"}, format="json").status_code == 201
    spend(owner, 100)
    stored = Message.objects.count()

    response = api.post(messages_url(conversation), {"content": "Again"}, format="json")

    detail = assert_detail(response, 429)
    used = quotas.token_usage(owner.pk).used
    assert f"You have used {used} of your 100 tokens for today" in detail
    assert "resets at 00:00" in detail
    wait = int(response["Retry-After"])
    assert 0 < wait <= 24 * 3600 + 1
    assert abs(
        (timezone.now() + timedelta(seconds=wait)) - quotas.token_usage(owner.pk).resets_at
    ) < (timedelta(seconds=5))
    assert Message.objects.count() == stored  # the refused message is not stored
    for refused in (
        api.post(f"/api/conversations/{conversation.pk}/regenerate/", format="json"),
        api.post("/api/messages/", {"content": "New chat"}, format="json"),
    ):
        assert refused.status_code == 429
    # Another user's tokens are their own.
    theirs = make_conversation(other_user, "Theirs")
    assert services.post_message(conversation=theirs, content="Hello").reply.status == "ok"


def test_a_users_own_quota_wins_over_the_servers_and_yesterday_does_not_count(
    api, owner, settings, fake_engine
):
    settings.CHATBOT_TOKENS_PER_DAY = 10
    spend(owner, 50)
    conversation = make_conversation(owner, "Chat")
    assert api.post(messages_url(conversation), {"content": "Hi"}, format="json").status_code == 429

    TokenQuota.objects.create(user=owner, tokens_per_day=0)  # unlimited for this user
    assert api.post(messages_url(conversation), {"content": "Hi"}, format="json").status_code == 201

    TokenQuota.objects.filter(user=owner).update(tokens_per_day=1000)
    Message.objects.filter(conversation__owner=owner).update(
        created_at=timezone.now() - timedelta(days=1)
    )
    body = api.get("/api/usage/").json()
    assert (body["tokens_today"], body["tokens_per_day"], body["tokens_left"]) == (0, 1000, 1000)
    yesterday = body["days"][1]
    assert yesterday["tokens"] >= 50 and yesterday["replies"] == 2
    assert len(body["days"]) == services.USAGE_DAYS and body["days"][0]["tokens"] == 0
    assert api.post(messages_url(conversation), {"content": "Hi"}, format="json").status_code == 201


def test_the_usage_page_and_the_refused_page_post(owner_client, owner, settings, fake_engine):
    settings.CHATBOT_TOKENS_PER_DAY = 40
    spend(owner, 30)
    page = owner_client.get("/usage/").content.decode()
    assert "<strong>30</strong> of <strong>40</strong> tokens used" in page
    assert "10 left" in page

    spend(owner, 10)
    conversation = make_conversation(owner, "Chat")
    response = owner_client.post(conversation.get_absolute_url(), {"content": "Hi"}, follow=True)
    assert "of your 40 tokens for today" in response.content.decode()
    assert not conversation.messages.exists()
    assert "new messages are refused" in owner_client.get("/usage/").content.decode()


def test_openai_clients_hear_429_in_openais_shape(owner, settings, fake_engine):
    from accounts.keys import issue_key

    settings.CHATBOT_TOKENS_PER_DAY = 5
    spend(owner, 5)
    key = issue_key(user=owner, name="client")[1]
    response = Client().post(
        "/v1/chat/completions",
        {"model": fake_engine.model_name, "messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 429
    assert "tokens for today" in response.json()["error"]["message"]
    assert int(response["Retry-After"]) > 0


def test_staff_set_a_users_quota_in_the_admin(admin_client, owner):
    response = admin_client.post(
        "/admin/accounts/tokenquota/add/", {"user": owner.pk, "tokens_per_day": 500}
    )
    assert response.status_code == 302, response.content
    assert TokenQuota.objects.get(user=owner).tokens_per_day == 500
    page = admin_client.get(f"/admin/auth/user/{owner.pk}/change/").content.decode()
    assert "Token quota" in page and 'value="500"' in page
