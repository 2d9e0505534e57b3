"""Nobody sees or touches what is not theirs. Every API endpoint and every page that takes a
conversation is tried by three people: the owner (it works), another user (404, nothing
changes, the model is not asked) and nobody (401 on the API, the login page for pages). A test
walks the URL configuration so that a new endpoint cannot be left out of these tables."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from conversations import services
from conversations.models import Conversation, Message
from tests.factories import make_conversation, snapshot

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
    "conversation-context": [("get", "/api/conversations/{id}/messages/{message}/context/", None)],
    "conversation-feedback": [
        ("post", "/api/conversations/{id}/messages/{message}/feedback/", {"rating": "up"})
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
    "conversations:context": [("get", "/c/{id}/m/{message}/context/", None)],
    "conversations:feedback": [("post", "/c/{id}/m/{message}/feedback/", {"rating": "down"})],
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


# The prefix cache: how much of a prompt the engine reuses shows in how soon the reply starts,
# so another user's conversation must lend nothing beyond what every user shares.

ALICE_PROMPT = " ".join(
    f"Rule {i}: the vault under the old mill opens with the word heron{i}." for i in range(20)
)
# The same number of tokens, other words from the first one on.
WRONG_GUESS = " ".join(
    f"Step {i}: the shed behind the new barn closes with the word otter{i}." for i in range(20)
)
ALICE_MESSAGE = "Please remember that my locker number is 4471 and my badge colour is teal."
# (From the first word on, too: Bob's own guess lends his copy what they share.)
WRONG_MESSAGE = "Kindly note down that my bicycle code is 9382 and my scarf shade is plum."


@pytest.fixture(scope="module")
def product_engine():
    """The bundled model on the engine the server builds from its settings (the default
    system prompt shared), for this module's tests."""
    from conversations import runtime

    previous = runtime.set_engine(None)
    engine = runtime.get_engine()
    engine.load()
    yield engine
    engine.scheduler.stop()
    runtime.set_engine(previous)


@pytest.fixture
def replies(product_engine, monkeypatch, settings):
    """Every ReplyStream the engine opens, in order (each knows its `reused_tokens`)."""
    settings.CHATBOT_AUTO_TITLE = False
    settings.CHATBOT_MAX_NEW_TOKENS = 2
    settings.CHATBOT_STALE_REPLY_SECONDS = 3600  # (no lease renewal while the test holds the db)
    opened = []
    stream = product_engine.stream

    def recording(*args, **kwargs):
        opened.append(stream(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(product_engine, "stream", recording)
    # Each test starts with nothing kept (its users may have an earlier test's ids).
    scheduler = product_engine.scheduler
    scheduler.call(lambda: scheduler.forget(lambda key: True)).result()
    return opened


def reused(client, replies, content, system_prompt=None) -> int:
    """Prompt tokens reused by the first reply of a new conversation, through the API."""
    body = {} if system_prompt is None else {"system_prompt": system_prompt}
    created = client.post("/api/conversations/", body, format="json")
    assert created.status_code == 201, created.content
    path = f"/api/conversations/{created.json()['id']}/messages/"
    assert client.post(path, {"content": content}, format="json").status_code == 201
    return replies[-1].reused_tokens


def test_a_copy_of_another_users_text_reuses_what_a_wrong_guess_does(
    api, other_api, product_engine, replies
):
    count = product_engine.count_tokens
    system = [{"role": "system", "content": ALICE_PROMPT}]
    assert count(system) == count([{"role": "system", "content": WRONG_GUESS}]) > 300
    assert reused(api, replies, "Hello.", ALICE_PROMPT) < 10, "Alice's is the first"
    assert reused(api, replies, ALICE_MESSAGE) > 0  # the default system prompt is shared

    # Bob guesses first (his own guess would lend to his copy what they share).
    guess = reused(other_api, replies, "Hello.", WRONG_GUESS)
    copy = reused(other_api, replies, "Hello.", ALICE_PROMPT)
    assert copy == guess < 10, "the template's header alone"
    reused(other_api, replies, "Hi.")  # (after which both reuse his own: up to "user")
    guess = reused(other_api, replies, WRONG_MESSAGE)
    copy = reused(other_api, replies, ALICE_MESSAGE)
    shared = count([{"role": "system", "content": "You are a helpful AI assistant."}])
    assert copy == guess and copy < shared + 10, "the default system prompt alone"

    # Alice's own new conversation starts from what hers computed.
    assert reused(api, replies, "Hello again.", ALICE_PROMPT) >= count(system) - 3

    # She deletes her conversations: nothing of them is kept, for her either.
    for conversation in api.get("/api/conversations/").json()["results"]:
        assert api.delete(f"/api/conversations/{conversation['id']}/").status_code == 204
    assert reused(api, replies, "Hello.", ALICE_PROMPT) < 10


def kept_owners(engine) -> set[str]:
    """The owners of what the engine keeps: the prefix cache's entries and the parked row."""
    scheduler = engine.scheduler

    def owners():
        parked = [scheduler.parked_key] if scheduler.parked_key is not None else []
        cached = [key for key, _ in engine.prefix_cache.entries()]
        return {key.owner for key in [*cached, *parked]}

    return scheduler.call(owners).result()


def test_deleting_a_user_drops_what_the_engine_keeps_of_their_conversations(
    owner, api, product_engine, replies
):
    reused(api, replies, "Hello.", ALICE_PROMPT)
    reused(api, replies, ALICE_MESSAGE)  # the first goes to the prefix cache, this one is parked

    assert str(owner.pk) in kept_owners(product_engine)
    owner.delete()
    assert str(owner.pk) not in kept_owners(product_engine)


def test_every_way_of_deleting_tells_the_engine(owner, api, client, fake_engine):
    conversations = [make_conversation(owner, f"Chat {i}", messages=2) for i in range(4)]
    ids = [str(c.pk) for c in conversations]
    assert api.delete(f"/api/conversations/{ids[0]}/").status_code == 204
    client.force_login(owner)
    client.post(f"/c/{ids[1]}/delete/")
    conversations[2].messages.first().delete()
    assert {ids[0], ids[1], ids[2]} <= set(fake_engine.forgotten) and ids[3] not in set(
        fake_engine.forgotten
    )
    owner.delete()
    assert ids[3] in fake_engine.forgotten


def test_deleting_a_conversation_tells_the_engine_once(owner, api, fake_engine):
    conversation = make_conversation(owner, "Long chat", messages=40)
    Message.objects.filter(conversation=conversation)[:1].get().delete()
    Message.objects.filter(pk__in=conversation.messages.values("pk")[:2]).delete()
    assert fake_engine.forgotten.count(str(conversation.pk)) == 3  # a message deleted alone: one

    assert api.delete(f"/api/conversations/{conversation.pk}/").status_code == 204
    assert fake_engine.forgotten.count(str(conversation.pk)) == 4  # not one per message
