"""Nobody sees or touches what is not theirs. Every API endpoint and every page that takes a
conversation is tried by three people: the owner (it works), another user (404, nothing
changes, the model is not asked) and nobody (401 on the API, the login page for pages). A test
walks the URL configuration so that a new endpoint cannot be left out of these tables."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from conversations import services
from conversations.models import Conversation, Message
from tests.test_api import make_conversation, snapshot

pytestmark = pytest.mark.django_db

SECRET = "Secret plans for Tuesday"

# name of the route -> (method, path, body); {id} is the conversation, {message} its last reply.
API = {
    "conversation-detail": [
        ("get", "/api/conversations/{id}/", None),
        ("patch", "/api/conversations/{id}/", {"title": "Taken"}),
        ("delete", "/api/conversations/{id}/", None),
    ],
    "conversation-messages": [
        ("get", "/api/conversations/{id}/messages/", None),
        ("post", "/api/conversations/{id}/messages/", {"content": "Hijack"}),
    ],
    "conversation-regenerate": [("post", "/api/conversations/{id}/regenerate/", None)],
    "conversation-edit": [("post", "/api/conversations/{id}/edit/", {"content": "Edited"})],
    "conversation-stop": [("post", "/api/conversations/{id}/stop/", None)],
    "conversation-activate": [
        ("post", "/api/conversations/{id}/activate/", {"message": "{message}"})
    ],
    "api-conversation-export": [("get", "/api/conversations/{id}/export/", None)],
    "api-messages": [("post", "/api/messages/", {"content": "Hijack", "conversation": "{id}"})],
}
PAGES = {
    "conversations:thread": [("get", "/c/{id}/", None), ("post", "/c/{id}/", {"content": "Hi"})],
    "conversations:regenerate": [("post", "/c/{id}/regenerate/", None)],
    "conversations:edit": [("post", "/c/{id}/edit/", {"content": "Edited"})],
    "conversations:activate": [("post", "/c/{id}/activate/", {"message": "{message}"})],
    "conversations:settings": [
        ("get", "/c/{id}/settings/", None),
        (
            "post",
            "/c/{id}/settings/",
            {"title": "Taken", "temperature": "0", "max_new_tokens": "8"},
        ),
    ],
    "conversations:delete": [("get", "/c/{id}/delete/", None), ("post", "/c/{id}/delete/", None)],
    "conversations:export": [("get", "/c/{id}/export/?format=json", None)],
}


def flatten(table):
    return [
        pytest.param(*case, id=f"{case[0]} {case[1]}") for cases in table.values() for case in cases
    ]


def routes_taking_a_conversation() -> set[str]:
    """Names of every route whose pattern has a conversation id, or that posts into one."""
    found = set()

    def walk(patterns, namespace=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                inner = f"{pattern.namespace}:" if pattern.namespace else namespace
                walk(pattern.url_patterns, inner)
            elif isinstance(pattern, URLPattern) and pattern.name:
                route = str(pattern.pattern)
                if "pk" in route or "conversation_id" in route:
                    found.add(namespace + pattern.name)

    walk(get_resolver().url_patterns)
    return found | {"api-messages"}


def test_every_route_taking_a_conversation_is_in_these_tables():
    assert routes_taking_a_conversation() == set(API) | set(PAGES)


@pytest.fixture
def chat(owner, fake_engine):
    conversation = make_conversation(owner, SECRET, system_prompt=SECRET)
    services.post_message(conversation=conversation, content=f"{SECRET}, tell nobody")
    fake_engine.calls.clear()
    return conversation


def fill(value, chat):
    reply = chat.messages.filter(role=Message.Role.ASSISTANT).latest("created_at")
    if isinstance(value, str):
        return value.format(id=chat.pk, message=reply.pk)
    if isinstance(value, dict):
        return {key: fill(item, chat) for key, item in value.items()}
    return value


def send(client, method, path, body, chat, *, api):
    extra = {"format": "json"} if api else {}
    return getattr(client, method)(fill(path, chat), fill(body, chat) or {}, **extra)


@pytest.mark.parametrize(("method", "path", "body"), flatten(API))
def test_api_owner_may(api, chat, method, path, body):
    response = send(api, method, path, body, chat, api=True)
    assert response.status_code < 400, response.content


def assert_refused(request, status, chat, fake_engine):
    """`request()` is answered with `status`, shows nothing of the conversation, changes
    nothing and asks the model nothing. Returns the response."""
    counts = (Message.objects.count(), Conversation.objects.count())
    before = snapshot(chat)
    response = request()
    assert response.status_code == status
    assert SECRET not in response.content.decode()
    assert snapshot(chat) == before
    assert (Message.objects.count(), Conversation.objects.count()) == counts
    assert fake_engine.calls == []
    return response


@pytest.mark.parametrize(("method", "path", "body"), flatten(API))
def test_api_another_user_gets_404_and_changes_nothing(
    other_api, chat, fake_engine, method, path, body
):
    assert_refused(
        lambda: send(other_api, method, path, body, chat, api=True), 404, chat, fake_engine
    )


@pytest.mark.parametrize(("method", "path", "body"), flatten(API))
def test_api_nobody_gets_401_and_changes_nothing(anon_api, chat, fake_engine, method, path, body):
    assert_refused(
        lambda: send(anon_api, method, path, body, chat, api=True), 401, chat, fake_engine
    )


@pytest.mark.parametrize(("method", "path", "body"), flatten(PAGES))
def test_page_owner_may(client, owner, chat, method, path, body):
    client.force_login(owner)
    response = send(client, method, path, body, chat, api=False)
    assert response.status_code in (200, 302), response.content[:500]


@pytest.mark.parametrize(("method", "path", "body"), flatten(PAGES))
def test_page_another_user_gets_404_and_changes_nothing(
    client, other_user, chat, fake_engine, method, path, body
):
    client.force_login(other_user)
    assert_refused(
        lambda: send(client, method, path, body, chat, api=False), 404, chat, fake_engine
    )


@pytest.mark.parametrize(("method", "path", "body"), flatten(PAGES))
def test_page_nobody_is_sent_to_log_in(client, chat, fake_engine, method, path, body):
    response = assert_refused(
        lambda: send(client, method, path, body, chat, api=False), 302, chat, fake_engine
    )
    assert response["Location"].startswith("/accounts/login/")


def test_search_finds_only_ones_own_conversations(api, other_api, client, owner, other_user, chat):
    assert [c["id"] for c in api.get("/api/conversations/?q=Tuesday").json()["results"]] == [
        str(chat.pk)
    ]
    assert other_api.get("/api/conversations/?q=Tuesday").json()["results"] == []
    assert other_api.get("/api/conversations/").json()["results"] == []
    client.force_login(other_user)
    for listing in ("/?q=Tuesday", "/"):
        page = client.get(listing)
        assert page.status_code == 200
        assert SECRET not in page.content.decode()


def test_page_forms_need_their_csrf_token(owner, fake_engine, chat):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    before = (snapshot(chat), Conversation.objects.count())
    for path, data in [
        ("/new/", {"content": "Forged"}),
        (f"/c/{chat.pk}/", {"content": "Forged"}),
        (f"/c/{chat.pk}/delete/", {}),
        (f"/c/{chat.pk}/settings/", {"title": "Forged", "temperature": "0", "max_new_tokens": "8"}),
    ]:
        assert browser.post(path, data).status_code == 403, path
    assert (snapshot(chat), Conversation.objects.count()) == before
    assert fake_engine.calls == []

    browser.get("/")  # the page sets the token cookie; its forms carry it
    token = browser.cookies["csrftoken"].value
    sent = browser.post(f"/c/{chat.pk}/", {"content": "Real", "csrfmiddlewaretoken": token})
    assert sent.status_code == 302
    assert chat.messages.filter(content="Real").exists()
