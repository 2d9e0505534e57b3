"""The thread page's actions without JavaScript: regenerate, edit, switch versions, settings,
delete; replies rendered as sanitized Markdown."""

import re

import pytest

from conversations import services
from conversations.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(owner, fake_engine):
    conversation = services.create_conversation(owner=owner, title="Chat")
    services.post_message(conversation=conversation, content="first question")
    return conversation


def url(conversation, action=""):
    return f"/c/{conversation.pk}/{action + '/' if action else ''}"


def page(client, conversation) -> str:
    response = client.get(url(conversation))
    assert response.status_code == 200
    return response.content.decode()


def active_contents(conversation):
    return list(
        conversation.messages.active_path().order_by("created_at").values_list("content", flat=True)
    )


def test_regenerate_keeps_both_versions_and_shows_the_switcher(owner_client, chat, fake_engine):
    fake_engine.replies = ["A second answer."]
    response = owner_client.post(url(chat, "regenerate"))
    assert response.status_code == 302
    assert active_contents(chat) == ["first question", "A second answer."]
    assert chat.messages.filter(role="assistant").count() == 2
    html = page(owner_client, chat)
    assert "2 / 2" in html
    assert "Echo: first question" not in html, "only the chosen version is shown"
    # The "previous version" button switches back.
    old = chat.messages.get(content="Echo: first question")
    assert f'value="{old.pk}"' in html
    owner_client.post(url(chat, "activate"), {"message": str(old.pk)})
    assert active_contents(chat) == ["first question", "Echo: first question"]
    assert "1 / 2" in page(owner_client, chat)


def test_edit_resends_and_keeps_the_earlier_branch(owner_client, chat, fake_engine):
    response = owner_client.post(url(chat, "edit"), {"content": "better question"})
    assert response.status_code == 302
    assert active_contents(chat) == ["better question", "Echo: better question"]
    html = page(owner_client, chat)
    assert "better question" in html and "2 / 2" in html
    old_question = chat.messages.get(content="first question")
    owner_client.post(url(chat, "activate"), {"message": str(old_question.pk)})
    assert active_contents(chat) == ["first question", "Echo: first question"]


def test_edit_with_empty_text_changes_nothing(owner_client, chat):
    before = chat.messages.count()
    response = owner_client.post(url(chat, "edit"), {"content": "   "}, follow=True)
    assert "must not be empty" in response.content.decode()
    assert chat.messages.count() == before


def test_switching_an_earlier_exchange_is_refused_with_a_message(owner_client, chat, fake_engine):
    first_reply = chat.messages.get(role="assistant")
    services.post_message(conversation=chat, content="second question")
    response = owner_client.post(
        url(chat, "activate"), {"message": str(first_reply.pk)}, follow=True
    )
    assert "Only the versions of the last message" in response.content.decode()


@pytest.mark.parametrize("message", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"])
def test_activate_unknown_message_is_404(owner_client, chat, message):
    assert owner_client.post(url(chat, "activate"), {"message": message}).status_code == 404


def test_regenerate_on_an_empty_chat_explains(owner_client, owner, fake_engine):
    empty = services.create_conversation(owner=owner)
    response = owner_client.post(url(empty, "regenerate"), follow=True)
    assert "no message to answer again" in response.content.decode()


def test_settings_rename_and_parameters(owner_client, chat, fake_engine):
    assert owner_client.get(url(chat, "settings")).status_code == 200
    response = owner_client.post(
        url(chat, "settings"),
        {
            "title": "Renamed",
            "system_prompt": "Be brief.",
            "temperature": "0.5",
            "max_new_tokens": "64",
        },
    )
    assert response.status_code == 302
    chat.refresh_from_db()
    assert (chat.title, chat.system_prompt, chat.temperature, chat.max_new_tokens) == (
        "Renamed",
        "Be brief.",
        0.5,
        64,
    )
    exchange = services.post_message(conversation=chat, content="again")
    assert exchange.reply.generation_params["temperature"] == 0.5
    assert exchange.reply.generation_params["max_new_tokens"] == 64
    assert fake_engine.calls[-1][0] == {"role": "system", "content": "Be brief."}


def test_settings_with_an_empty_system_prompt_removes_it(owner_client, chat, fake_engine):
    """The same meaning as on the API and when a chat is started: empty is no system prompt."""
    response = owner_client.post(
        url(chat, "settings"),
        {"title": "Chat", "system_prompt": "", "temperature": "", "max_new_tokens": ""},
    )

    assert response.status_code == 302
    chat.refresh_from_db()
    assert chat.system_prompt == ""
    services.post_message(conversation=chat, content="again")
    assert fake_engine.calls[-1][0]["role"] == "user"


def test_settings_page_shows_the_default_system_prompt(owner_client, chat, settings):
    settings.CHATBOT_SYSTEM_PROMPT = "Default <prompt>."

    html = owner_client.get(url(chat, "settings")).content.decode()

    assert "Empty: no system prompt." in html
    assert "Default &lt;prompt&gt;." in html, "shown as text"


def test_settings_reject_out_of_range_values(owner_client, chat):
    response = owner_client.post(
        url(chat, "settings"),
        {"title": "x", "system_prompt": "", "temperature": "7", "max_new_tokens": "0"},
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "less than or equal to 2" in html and "greater than or equal to 1" in html
    chat.refresh_from_db()
    assert chat.title == "Chat"


def test_delete_asks_first_then_deletes(owner_client, chat):
    confirm = owner_client.get(url(chat, "delete"))
    assert confirm.status_code == 200
    assert "2 messages will be deleted" in confirm.content.decode()
    assert Conversation.objects.filter(pk=chat.pk).exists(), "a GET deletes nothing"
    response = owner_client.post(url(chat, "delete"), follow=True)
    assert not Conversation.objects.filter(pk=chat.pk).exists()
    assert not Message.objects.filter(conversation_id=chat.pk).exists()
    assert "Deleted" in response.content.decode()


@pytest.mark.parametrize("action", ["regenerate", "edit", "activate", "settings", "delete"])
def test_another_users_chat_is_404_for_every_action(client, other_user, chat, action):
    client.force_login(other_user)
    before = list(chat.messages.values_list("pk", "is_active", "content"))
    assert (
        client.post(url(chat, action), {"content": "x", "message": "x", "title": "x"}).status_code
        == 404
    )
    assert client.get(url(chat, "settings")).status_code == 404
    assert list(chat.messages.values_list("pk", "is_active", "content")) == before
    assert Conversation.objects.filter(pk=chat.pk, title="Chat").exists()


@pytest.mark.parametrize("action", ["regenerate", "edit", "activate", "settings", "delete"])
def test_anonymous_is_sent_to_log_in(client, chat, action):
    response = client.post(url(chat, action))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_replies_render_markdown_and_user_text_stays_plain(owner_client, owner, fake_engine):
    conversation = services.create_conversation(owner=owner)
    fake_engine.replies = [
        "**bold** and `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "[site](https://example.test) [bad](javascript:alert(1)) <script>alert(2)</script>"
    ]
    services.post_message(conversation=conversation, content="**not bold** <b>x</b>")
    html = page(owner_client, conversation)
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<table>" in html
    assert re.search(r'<a href="https://example.test" rel="nofollow noopener noreferrer">', html)
    assert 'href="javascript:' not in html
    assert "<script>alert(2)" not in html and "&lt;script&gt;alert(2)" in html
    assert "**not bold** &lt;b&gt;x&lt;/b&gt;" in html, "user text is shown as typed"


def test_cancelled_and_interrupted_replies_are_labelled(owner_client, owner):
    conversation = services.create_conversation(owner=owner)
    question = Message.objects.create(conversation=conversation, role="user", content="q")
    for status in ("cancelled", "interrupted"):
        Message.objects.create(
            conversation=conversation,
            role="assistant",
            content=f"partial {status}",
            status=status,
            reply_to=question,
            version_group=question.pk,
            is_active=status == "interrupted",
        )
    html = page(owner_client, conversation)
    assert "Interrupted" in html and "partial interrupted" in html
    services.activate_version(
        conversation=conversation, message=conversation.messages.get(status="cancelled")
    )
    assert "Stopped" in page(owner_client, conversation)


def test_message_counts_show_what_the_thread_shows(owner_client, chat, fake_engine, api):
    owner_client.post(url(chat, "regenerate"))
    owner_client.post(url(chat, "edit"), {"content": "better question"})
    assert chat.messages.count() == 5  # every version is stored
    listing = owner_client.get("/").content.decode()
    assert "2 messages" in listing
    assert api.get(f"/api/conversations/{chat.pk}/").json()["message_count"] == 2
    assert api.get("/api/conversations/").json()["results"][0]["message_count"] == 2
