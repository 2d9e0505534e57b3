"""The Django admin for conversations and messages."""

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations import services
from conversations.models import Message

pytestmark = pytest.mark.django_db

CONVERSATIONS = "/admin/conversations/conversation/"
MESSAGES = "/admin/conversations/message/"


@pytest.fixture
def chats(owner, other_user):
    """Two conversations: one ok exchange and one failed reply."""
    start = timezone.now() - timedelta(hours=1)
    weather = services.create_conversation(owner=owner, title="Weather talk")
    recipes = services.create_conversation(owner=other_user, title="Recipes")
    rows = [
        (weather, "user", "ok", "Will it rain tomorrow?", ""),
        (weather, "assistant", "ok", "Probably not, bring sunglasses.", ""),
        (recipes, "user", "ok", "How do I bake bread?", ""),
        (recipes, "assistant", "error", "", "RuntimeError: oven on fire"),
    ]
    for i, (conversation, role, status, content, error) in enumerate(rows):
        Message.objects.create(
            conversation=conversation,
            role=role,
            status=status,
            content=content,
            error=error,
            model="fake-echo" if role == "assistant" else "",
            completion_tokens=5 if status == "ok" and role == "assistant" else None,
            created_at=start + timedelta(seconds=i),
        )
    return weather, recipes


def result_ids(response) -> set:
    return {obj.pk for obj in response.context["cl"].result_list}


def test_conversation_changelist(admin_client, chats):
    weather, recipes = chats

    response = admin_client.get(CONVERSATIONS)

    assert response.status_code == 200
    assert result_ids(response) == {weather.pk, recipes.pk}
    page = response.content.decode()
    assert "Weather talk" in page
    assert "Recipes" in page
    assert "intruder" in page  # the owner column
    counts = {obj.pk: obj.message_count for obj in response.context["cl"].result_list}
    assert counts == {weather.pk: 2, recipes.pk: 2}


def test_conversation_search_by_message_text_keeps_counts_right(admin_client, chats):
    weather, _ = chats
    Message.objects.create(conversation=weather, role="user", content="More rain questions")

    response = admin_client.get(CONVERSATIONS, {"q": "rain"})

    assert response.status_code == 200
    results = response.context["cl"].result_list
    assert [obj.pk for obj in results] == [weather.pk]
    # Two messages match the search; the count still counts every message once.
    assert results[0].message_count == 3


def test_conversation_change_page_lists_messages_read_only(admin_client, chats):
    weather, _ = chats

    response = admin_client.get(f"{CONVERSATIONS}{weather.pk}/change/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "Will it rain tomorrow?" in page
    assert "Probably not, bring sunglasses." in page
    assert "How do I bake bread?" not in page
    (inline,) = response.context["inline_admin_formsets"]
    assert len(inline.forms) == 2
    assert not inline.has_add_permission
    assert not inline.has_change_permission
    assert not inline.formset.can_delete
    assert 'name="messages-0-content"' not in page
    assert 'name="messages-0-DELETE"' not in page
    # The conversation's own editable fields are a form.
    assert 'name="title"' in page
    assert 'name="system_prompt"' in page


def inline_management_form(prefix: str, forms: int) -> dict[str, str]:
    """The management form of an inline formset showing `forms` existing rows, as the change
    page posts it: the admin refuses a save without it."""
    counts = {"TOTAL": forms, "INITIAL": forms, "MIN_NUM": 0, "MAX_NUM": 1000}
    return {f"{prefix}-{name}_FORMS": str(count) for name, count in counts.items()}


def test_conversation_change_page_saves_title(admin_client, chats):
    weather, _ = chats

    response = admin_client.post(
        f"{CONVERSATIONS}{weather.pk}/change/",
        {
            "title": "Renamed",
            "system_prompt": weather.system_prompt,
            **inline_management_form("messages", forms=2),
        },
    )

    assert response.status_code == 302
    weather.refresh_from_db()
    assert weather.title == "Renamed"
    assert weather.messages.count() == 2


def test_message_changelist(admin_client, chats):
    response = admin_client.get(MESSAGES)

    assert response.status_code == 200
    assert response.context["cl"].result_count == 4
    page = response.content.decode()
    assert "Weather talk" in page
    assert "RuntimeError: oven on fire" in page  # a failed reply shows its error


def test_message_search(admin_client, chats):
    response = admin_client.get(MESSAGES, {"q": "bread"})

    assert response.status_code == 200
    assert [m.content for m in response.context["cl"].result_list] == ["How do I bake bread?"]


def test_message_search_by_owner(admin_client, chats):
    response = admin_client.get(MESSAGES, {"q": "intruder"})

    assert {m.conversation.title for m in response.context["cl"].result_list} == {"Recipes"}
    assert response.context["cl"].result_count == 2


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"role": "user"}, {"Will it rain tomorrow?", "How do I bake bread?"}),
        ({"role": "assistant"}, {"Probably not, bring sunglasses.", ""}),
        ({"status": "error"}, {""}),
        ({"status": "error", "role": "user"}, set()),
    ],
)
def test_message_filters(admin_client, chats, query, expected):
    response = admin_client.get(MESSAGES, query)

    assert response.status_code == 200
    results = list(response.context["cl"].result_list)
    assert {m.content for m in results} == expected
    for field, value in query.items():
        assert all(getattr(m, field) == value for m in results)


def test_message_change_page_is_read_only(admin_client, chats):
    message = Message.objects.get(content="How do I bake bread?")

    response = admin_client.get(f"{MESSAGES}{message.pk}/change/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "How do I bake bread?" in page
    assert 'name="content"' not in page


def test_messages_cannot_be_added_in_the_admin(admin_client, chats):
    assert admin_client.get(f"{MESSAGES}add/").status_code == 403


@pytest.mark.parametrize("url", ["/admin/", CONVERSATIONS, MESSAGES])
def test_non_staff_users_are_sent_to_the_admin_login(client, owner, url):
    client.force_login(owner)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={url}"


def test_anonymous_users_are_sent_to_the_admin_login(client, db):
    response = client.get(CONVERSATIONS)

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_a_reply_shows_what_the_model_read_and_the_logs_filter_by_feedback(
    admin_client, api, owner, fake_engine
):
    """The message page shows a reply's context record as the thread's context page does; the
    message log filters by rating, the conversation list by replies rated up or down."""
    conversation = services.create_conversation(owner=owner, title="Rated", system_prompt="Terse.")
    url = f"/api/conversations/{conversation.pk}/messages/"
    api.post(url, {"content": "First question"}, format="json")
    second = api.post(url, {"content": "Second question"}, format="json").json()["reply"]
    other = services.create_conversation(owner=owner, title="Unrated")
    services.post_message(conversation=other, content="Nothing to rate")
    reply = Message.objects.get(pk=second["id"])
    services.rate_reply(reply=reply, rating=Message.Rating.DOWN, feedback="Wrong.")

    page = admin_client.get(f"{MESSAGES}{reply.pk}/change/").content.decode()
    assert "What the model read" in page
    assert "Terse." in page and "First question" in page and "Echo: First question" in page
    assert "Wrong." in page

    assert result_ids(admin_client.get(MESSAGES, {"rating__exact": "-1"})) == {reply.pk}
    assert result_ids(admin_client.get(MESSAGES, {"rating__exact": "1"})) == set()
    assert result_ids(admin_client.get(CONVERSATIONS, {"feedback": "down"})) == {conversation.pk}
    assert result_ids(admin_client.get(CONVERSATIONS, {"feedback": "up"})) == set()
    assert result_ids(admin_client.get(CONVERSATIONS, {"feedback": "any"})) == {conversation.pk}
    assert result_ids(admin_client.get(CONVERSATIONS)) == {conversation.pk, other.pk}
