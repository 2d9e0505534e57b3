"""The server-rendered pages: accounts, the chat list, threads, escaping and failures."""

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from conversations.models import Conversation, Message
from tests.conftest import PASSWORD
from tests.factories import make_conversation

pytestmark = pytest.mark.django_db

LOGIN_URL = "/accounts/login/"
STRONG_PASSWORD = "Correct-horse-battery-9"


def thread_url(conversation) -> str:
    return f"/c/{conversation.pk}/"


def html(response) -> str:
    return response.content.decode()


# --- accounts ------------------------------------------------------------------------------------


def test_signup_creates_a_user_and_logs_in(client, db):
    assert client.get("/accounts/signup/").status_code == 200

    response = client.post(
        "/accounts/signup/",
        {"username": "newcomer", "password1": STRONG_PASSWORD, "password2": STRONG_PASSWORD},
    )

    assert response.status_code == 302
    assert response["Location"] == "/"
    user = get_user_model().objects.get(username="newcomer")
    assert user.check_password(STRONG_PASSWORD)
    assert client.session["_auth_user_id"] == str(user.pk)
    page = client.get("/")
    assert page.status_code == 200
    assert "Log out newcomer" in html(page)


@pytest.mark.parametrize(
    ("password1", "password2"),
    [("123", "123"), ("password", "password"), (STRONG_PASSWORD, STRONG_PASSWORD + "x")],
    ids=["short-numeric", "common", "mismatch"],
)
def test_signup_rejects_bad_passwords(client, db, password1, password2):
    response = client.post(
        "/accounts/signup/",
        {"username": "newcomer", "password1": password1, "password2": password2},
    )

    assert response.status_code == 200
    assert response.context["form"].errors
    assert 'class="errors"' in html(response)
    assert not get_user_model().objects.filter(username="newcomer").exists()
    assert "_auth_user_id" not in client.session


def test_signup_shows_the_password_error(client, db):
    response = client.post(
        "/accounts/signup/", {"username": "newcomer", "password1": "123", "password2": "123"}
    )

    assert "too short" in html(response)


def test_signup_rejects_a_taken_username(client, owner):
    response = client.post(
        "/accounts/signup/",
        {"username": "owner", "password1": STRONG_PASSWORD, "password2": STRONG_PASSWORD},
    )

    assert response.status_code == 200
    assert "already exists" in html(response)
    assert get_user_model().objects.filter(username="owner").count() == 1


def test_login_and_logout(client, owner):
    response = client.post(LOGIN_URL, {"username": "owner", "password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200

    response = client.post("/accounts/logout/")

    assert response.status_code == 302
    assert response["Location"] == LOGIN_URL
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302


def test_login_with_a_wrong_password_shows_an_error(client, owner):
    response = client.post(LOGIN_URL, {"username": "owner", "password": "wrong"})

    assert response.status_code == 200
    assert "correct username and password" in html(response)
    assert "_auth_user_id" not in client.session


def test_login_follows_next(client, owner):
    conversation = make_conversation(owner, "Deep link")

    response = client.post(
        f"{LOGIN_URL}?next={thread_url(conversation)}",
        {"username": "owner", "password": PASSWORD, "next": thread_url(conversation)},
    )

    assert response["Location"] == thread_url(conversation)


def test_logout_by_get_is_refused(owner_client):
    response = owner_client.get("/accounts/logout/")

    assert response.status_code == 405
    assert "_auth_user_id" in owner_client.session


# --- anonymous users -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_users_are_sent_to_login(client, owner, fake_engine, method):
    conversation = make_conversation(owner, "Private")
    urls = (
        ["/", thread_url(conversation)] if method == "get" else ["/new/", thread_url(conversation)]
    )

    for url in urls:
        response = getattr(client, method)(url, {"content": "hello"} if method == "post" else None)
        assert response.status_code == 302
        assert response["Location"] == f"{LOGIN_URL}?next={url}"

    assert Message.objects.count() == 0
    assert Conversation.objects.count() == 1
    assert fake_engine.calls == []


# --- the list page -------------------------------------------------------------------------------


def test_list_shows_own_conversations_newest_first(owner_client, owner, other_user):
    now = timezone.now()
    make_conversation(owner, "Oldest chat", updated_at=now - timedelta(hours=3), messages=1)
    make_conversation(owner, "Newest chat", updated_at=now - timedelta(hours=1), messages=2)
    make_conversation(owner, "Middle chat", updated_at=now - timedelta(hours=2))
    make_conversation(other_user, "Somebody else's chat", updated_at=now, messages=5)

    response = owner_client.get("/")

    assert response.status_code == 200
    page = html(response)
    titles = re.findall(r'<span class="title">(.*?)</span>', page)
    assert titles == ["Newest chat", "Middle chat", "Oldest chat"]
    counts = re.findall(r"· (\d+ messages?)", page)
    assert counts == ["2 messages", "0 messages", "1 message"]
    assert "Somebody else" not in page


def test_list_without_conversations(owner_client):
    response = owner_client.get("/")

    assert response.status_code == 200
    assert "No chats yet" in html(response)


def test_untitled_conversation_gets_a_placeholder(owner_client, owner):
    make_conversation(owner, "")

    assert "Untitled chat" in html(owner_client.get("/"))


# --- starting and continuing conversations ------------------------------------------------------


def test_new_conversation_redirects_to_its_thread(owner_client, owner, fake_engine):
    response = owner_client.post("/new/", {"content": "Hello from the page", "system_prompt": ""})

    conversation = Conversation.objects.get()
    assert response.status_code == 302
    assert response["Location"] == thread_url(conversation)
    assert conversation.owner == owner
    assert conversation.title == "Hello from the page"

    page = html(owner_client.get(response["Location"]))
    assert "Hello from the page" in page
    assert "Echo: Hello from the page" in page
    assert "fake-echo" in page


def test_new_conversation_with_a_system_prompt(owner_client, fake_engine, settings):
    settings.CHATBOT_SYSTEM_PROMPT = "Default prompt."

    owner_client.post("/new/", {"content": "Hi", "system_prompt": "Speak in rhymes."})

    assert Conversation.objects.get().system_prompt == "Speak in rhymes."
    assert fake_engine.calls[0][0] == {"role": "system", "content": "Speak in rhymes."}


def test_new_conversation_without_a_system_prompt_uses_the_default(
    owner_client, fake_engine, settings
):
    settings.CHATBOT_SYSTEM_PROMPT = "Default prompt."

    owner_client.post("/new/", {"content": "Hi"})

    assert Conversation.objects.get().system_prompt == "Default prompt."


def test_the_new_chat_form_offers_the_default_system_prompt(owner_client, settings):
    settings.CHATBOT_SYSTEM_PROMPT = "Default <prompt>."

    page = html(owner_client.get("/"))

    assert re.search(
        r'<textarea name="system_prompt"[^>]*>\s*Default &lt;prompt&gt;\.</textarea>', page
    )


def test_new_conversation_with_an_empty_system_prompt_has_none(owner_client, fake_engine, settings):
    """Emptied on the page, as on the API and in an import: no system prompt at all."""
    settings.CHATBOT_SYSTEM_PROMPT = "Default prompt."

    owner_client.post("/new/", {"content": "Hi", "system_prompt": ""})

    assert Conversation.objects.get().system_prompt == ""
    assert fake_engine.calls[0] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("content", ["", "   \n "])
def test_new_conversation_with_empty_content_is_400(owner_client, fake_engine, content):
    response = owner_client.post("/new/", {"content": content, "system_prompt": ""})

    assert response.status_code == 400
    assert response.context["form"].errors["content"]
    assert 'class="errors"' in html(response)
    assert Conversation.objects.count() == 0
    assert Message.objects.count() == 0
    assert fake_engine.calls == []


def test_invalid_new_conversation_still_lists_newest_first(owner_client, owner):
    now = timezone.now()
    # Primary keys ascend from oldest to newest, so an unordered (grouped by pk) list would show
    # the oldest first.
    for i, title in enumerate(["Oldest chat", "Middle chat", "Newest chat"], start=1):
        Conversation.objects.create(
            id=uuid.UUID(int=i), owner=owner, title=title, updated_at=now - timedelta(hours=4 - i)
        )

    response = owner_client.post("/new/", {"content": " ", "system_prompt": ""})

    assert response.status_code == 400
    titles = re.findall(r'<span class="title">(.*?)</span>', html(response))
    assert titles == ["Newest chat", "Middle chat", "Oldest chat"]


def test_new_conversation_by_get_is_refused(owner_client):
    assert owner_client.get("/new/").status_code == 405


def test_sending_without_javascript_redirects_to_the_thread(owner_client, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")

    response = owner_client.post(thread_url(conversation), {"content": "Plain form post"})

    assert response.status_code == 302
    assert response["Location"] == f"{thread_url(conversation)}#latest"
    assert [(m.role, m.content) for m in conversation.messages.order_by("created_at")] == [
        ("user", "Plain form post"),
        ("assistant", "Echo: Plain form post"),
    ]

    followed = owner_client.post(thread_url(conversation), {"content": "Second post"}, follow=True)
    assert followed.status_code == 200
    page = html(followed)
    positions = [
        page.index(text)
        for text in ("Plain form post", "Echo: Plain form post", "Second post", "Echo: Second post")
    ]
    assert positions == sorted(positions)
    assert "saw 2 earlier messages" in page


@pytest.mark.parametrize("content", ["", "  \t\n  "])
def test_empty_message_on_the_thread_is_400(owner_client, owner, fake_engine, content):
    conversation = make_conversation(owner, "Chat")

    response = owner_client.post(thread_url(conversation), {"content": content})

    assert response.status_code == 400
    assert response.context["form"].errors["content"]
    page = html(response)
    assert 'class="errors"' in page
    assert re.search(r"This field is required|must not be empty", page)
    assert conversation.messages.count() == 0
    assert fake_engine.calls == []


def test_post_without_any_field_on_the_thread_is_400(owner_client, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")

    response = owner_client.post(thread_url(conversation), {})

    assert response.status_code == 400
    assert "This field is required" in html(response)
    assert conversation.messages.count() == 0


def test_too_long_message_on_the_thread_is_400(owner_client, owner, fake_engine, settings):
    settings.CHATBOT_MAX_MESSAGE_CHARS = 20
    conversation = make_conversation(owner, "Chat")

    response = owner_client.post(thread_url(conversation), {"content": "x" * 21})

    assert response.status_code == 400
    assert "the limit is 20" in html(response)
    assert conversation.messages.count() == 0


# --- ownership -----------------------------------------------------------------------------------


def test_another_users_thread_is_404(client, owner, other_user, fake_engine):
    conversation = make_conversation(owner, "Owner's secrets", messages=2)
    client.force_login(other_user)

    get = client.get(thread_url(conversation))
    post = client.post(thread_url(conversation), {"content": "Let me in"})

    assert get.status_code == 404
    assert post.status_code == 404
    assert "Owner's secrets" not in html(get)
    assert conversation.messages.count() == 2
    assert not Message.objects.filter(content="Let me in").exists()
    assert fake_engine.calls == []


def test_missing_thread_is_404(owner_client):
    assert owner_client.get(f"/c/{uuid.uuid4()}/").status_code == 404
    assert owner_client.get("/c/not-a-uuid/").status_code == 404


# --- escaping ------------------------------------------------------------------------------------


def test_user_content_and_replies_are_escaped(owner_client, owner, fake_engine):
    conversation = make_conversation(owner, "")

    owner_client.post(thread_url(conversation), {"content": "<script>alert(1)</script>"})
    owner_client.post(thread_url(conversation), {"content": "<img src=x onerror=alert(1)>"})

    page = html(owner_client.get(thread_url(conversation)))
    assert "<script>alert(1)</script>" not in page
    assert "<img src=x onerror" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # The reply echoes the message, so the model's text is escaped too.
    assert "Echo: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Echo: &lt;img src=x onerror=alert(1)&gt;" in page

    # The title, taken from the first message, is escaped on the list page as well.
    listing = html(owner_client.get("/"))
    assert "<script>alert(1)</script>" not in listing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing


def test_system_prompt_is_escaped(owner_client, fake_engine):
    owner_client.post("/new/", {"content": "Hi", "system_prompt": "<b onmouseover=x>bold</b>"})

    page = html(owner_client.get(thread_url(Conversation.objects.get())))
    assert "<b onmouseover" not in page
    assert "&lt;b onmouseover=x&gt;bold&lt;/b&gt;" in page


# --- generation failures -------------------------------------------------------------------------


def test_generation_failure_is_shown_on_the_thread(owner_client, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    fake_engine.fail_with = RuntimeError("boom")

    response = owner_client.post(
        thread_url(conversation), {"content": "Are you there?"}, follow=True
    )

    assert response.status_code == 200
    page = html(response)
    flashes = [str(m) for m in response.context["messages"]]
    assert len(flashes) == 1
    assert "boom" in flashes[0]
    assert re.search(r'class="flash-error"[^>]*>[^<]*boom', page)
    assert re.search(r'class="error-text"><strong>No reply:</strong> RuntimeError: boom', page)
    assert "Are you there?" in page
    assert conversation.messages.filter(role="user", content="Are you there?").exists()
    assert conversation.messages.filter(role="assistant", status="error").exists()

    # The flash is shown once; the failed reply stays on the thread.
    again = html(owner_client.get(thread_url(conversation)))
    assert "flash-error" not in again
    assert "No reply:" in again


def test_generation_failure_when_starting_shows_the_new_thread(owner_client, fake_engine):
    fake_engine.fail_with = RuntimeError("boom")

    response = owner_client.post("/new/", {"content": "First try", "system_prompt": ""})

    conversation = Conversation.objects.get()
    assert response.status_code == 302
    assert response["Location"] == thread_url(conversation)
    page = html(owner_client.get(response["Location"]))
    assert "First try" in page
    assert "RuntimeError: boom" in page
    assert "flash-error" in page


def test_settings_page_cleans_the_title(owner_client, owner):
    conversation = make_conversation(owner, "Before")

    response = owner_client.post(
        f"/c/{conversation.pk}/settings/",
        {
            "title": "New\r\nname\x1b[1m\u202e!",
            "system_prompt": "",
            "temperature": "",
            "max_new_tokens": "",
        },
    )

    assert response.status_code == 302
    conversation.refresh_from_db()
    assert conversation.title == "New name[1m!"
    assert "\u202e" not in html(owner_client.get("/"))


# --- security headers: a strict Content-Security-Policy, and no-store on private answers ----------


def _csp(response) -> dict[str, str]:
    policy = response.headers.get("Content-Security-Policy", "")
    directives = (part.strip().partition(" ") for part in policy.split(";") if part.strip())
    return {name: value for name, _, value in directives}


@pytest.mark.parametrize("path", ["/accounts/login/", "/accounts/signup/", "/api/docs/"])
def test_pages_have_a_strict_content_security_policy(client, db, path):
    policy = _csp(client.get(path))

    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["object-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in " ".join(policy.values())


def test_private_pages_have_the_policy_and_are_not_stored(owner_client, owner):
    conversation = make_conversation(owner, "Private", messages=2)
    for path in [
        "/",
        thread_url(conversation),
        f"/c/{conversation.pk}/settings/",
        f"/c/{conversation.pk}/export/?format=json",
        f"/c/{conversation.pk}/export/?format=md",
        "/api/conversations/",
        f"/api/conversations/{conversation.pk}/messages/",
        f"/api/conversations/{conversation.pk}/export/?format=json",
        f"/api/conversations/{conversation.pk}/export/?format=md",
    ]:
        response = owner_client.get(path)
        assert response.status_code == 200, path
        assert "no-store" in response.headers.get("Cache-Control", ""), path
        assert _csp(response)["script-src"] == "'self'", path


def test_api_answers_to_a_token_are_not_stored(api, owner):
    conversation = make_conversation(owner, "Private")

    response = api.get(f"/api/conversations/{conversation.pk}/")

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]


# Inline script or style, or an on* handler, would need 'unsafe-inline', which the policy denies.
INLINE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son[a-z]+=", re.IGNORECASE)


def test_templates_hold_no_inline_script_style_or_handlers():
    from django.conf import settings

    templates = [path for root in settings.TEMPLATES[0]["DIRS"] for path in root.rglob("*.html")]
    assert templates
    for path in templates:
        assert not INLINE.search(path.read_text()), path


def test_the_api_docs_load_their_script_from_a_url(client, db):
    page = client.get("/api/docs/").content.decode()
    assert not INLINE.search(page)
    script = re.search(r'<script src="(/api/docs/\?[^"]*)"', page)
    assert script, page

    response = client.get(script[1].replace("&amp;", "&"))

    assert response.status_code == 200
    assert "javascript" in response["Content-Type"]
