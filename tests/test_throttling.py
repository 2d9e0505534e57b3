"""Rate limits: messages per user (API and pages), sign-in attempts per client address. A
refused request gets 429 with Retry-After, and stores nothing."""

import pytest

from conversations.models import Conversation, Message
from tests.conftest import PASSWORD
from tests.factories import assert_detail, make_conversation, messages_url

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


def test_every_page_that_asks_the_model_is_limited_after_its_ownership_check(
    client, owner, other_user, fake_engine, two_per_minute
):
    client.force_login(owner)
    mine = make_conversation(owner, "Chat")
    theirs = make_conversation(other_user, "Theirs")
    for text in ("one", "two"):
        assert client.post(f"/c/{mine.pk}/", {"content": text}).status_code == 302
    stored = Message.objects.count()

    for action in ("", "regenerate/", "edit/"):
        refused = client.post(f"/c/{mine.pk}/{action}", {"content": "three"})
        assert refused.status_code == 429
        assert_retry_after(refused)
        # Someone else's conversation is not found, limit or not.
        assert client.post(f"/c/{theirs.pk}/{action}", {"content": "x"}).status_code == 404
    assert Message.objects.count() == stored


# --- who a client is: the address the server sees, not a header it sends --------------------------


@pytest.fixture
def limit_of_ten(settings):
    settings.CHATBOT_LOGINS_PER_MINUTE = 10


def forwarded(i):
    return {"HTTP_X_FORWARDED_FOR": f"10.0.{i}.1"}


def test_a_forged_forwarded_for_header_does_not_escape_the_limit(anon_api, owner, limit_of_ten):
    answers = [
        anon_api.post(
            "/api/token/", {"username": owner.username, "password": "nope"}, **forwarded(i)
        ).status_code
        for i in range(40)
    ]
    assert answers == [400] * 10 + [429] * 30
    # The right password is refused too while the limit holds.
    right = anon_api.post(
        "/api/token/", {"username": owner.username, "password": PASSWORD}, **forwarded(99)
    )
    assert_detail(right, 429)
    assert "token" not in right.json()


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_sign_in_pages_ignore_a_forged_forwarded_for_header(client, owner, limit_of_ten, path):
    owner.is_staff = owner.is_superuser = True
    owner.save()
    for i in range(10):
        wrong = client.post(path, {"username": owner.username, "password": "nope"}, **forwarded(i))
        assert wrong.status_code == 200  # the form again, with its error
    refused = client.post(path, {"username": owner.username, "password": PASSWORD}, **forwarded(50))
    assert refused.status_code == 429
    assert_retry_after(refused)
    assert "_auth_user_id" not in client.session


def test_sign_up_ignores_a_forged_forwarded_for_header(client, limit_of_ten):
    from django.contrib.auth import get_user_model

    for i in range(15):
        client.post(
            "/accounts/signup/",
            {"username": f"new{i}", "password1": PASSWORD, "password2": PASSWORD},
            **forwarded(i),
        )
        client.logout()
    assert get_user_model().objects.count() == 10


def test_admin_login_attempts_are_limited(client, owner, two_per_minute):
    owner.is_staff = owner.is_superuser = True
    owner.save()
    for _ in range(2):
        assert (
            client.post("/admin/login/", {"username": "owner", "password": "no"}).status_code == 200
        )
    refused = client.post("/admin/login/", {"username": "owner", "password": PASSWORD})
    assert refused.status_code == 429
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/login/").status_code == 200, "showing the form is not limited"


def test_wrong_passwords_for_one_username_from_many_addresses_are_limited(
    anon_api, owner, other_user, two_per_minute
):
    def attempt(username, address, password="nope"):
        body = {"username": username, "password": password}
        return anon_api.post("/api/token/", body, REMOTE_ADDR=address).status_code

    assert [attempt("owner", f"192.0.2.{i}") for i in range(4)] == [400, 400, 429, 429]
    assert attempt("owner", "192.0.2.99", PASSWORD) == 429
    # Another username from a fresh address has its own budget.
    assert attempt(other_user.username, "192.0.2.100", PASSWORD) == 200


def test_behind_configured_proxies_the_forwarded_address_is_the_client(
    anon_api, owner, two_per_minute, settings
):
    settings.CHATBOT_TRUSTED_PROXIES = 1

    def attempt(chain):
        body = {"username": f"user-{chain}", "password": "nope"}  # no per-username limit
        return anon_api.post("/api/token/", body, HTTP_X_FORWARDED_FOR=chain).status_code

    # The proxy appends the address it saw: that last one is the client, whatever came before.
    assert [attempt(f"10.9.{i}.9, 203.0.113.7") for i in range(3)] == [400, 400, 429]
    assert attempt("203.0.113.8") == 400, "another client behind the proxy has its own budget"
