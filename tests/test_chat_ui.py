"""The chat UI's server side: the remembered colour theme (a cookie the server renders every page
in, no JavaScript needed), and the chat list beside a thread. What only a browser shows (dark
colours, the phone menu, copy buttons, keys) is in test_browser.py."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from conversations.models import Conversation
from tests.factories import make_conversation

pytestmark = pytest.mark.django_db

THEME = reverse("conversations:theme")


def html_theme(response) -> str:
    head = response.content.decode()[:300]
    return head.split('data-theme="', 1)[1].split('"', 1)[0]


def test_the_theme_follows_the_system_until_one_is_chosen_and_is_remembered(client, owner):
    client.force_login(owner)
    assert html_theme(client.get("/")) == "system"

    response = client.post(THEME, {"theme": "dark", "next": "/usage/"})
    assert response.status_code == 302 and response["Location"] == "/usage/"
    assert response.cookies["theme"].value == "dark"
    assert response.cookies["theme"]["max-age"] == 365 * 24 * 3600
    assert html_theme(client.get("/")) == "dark"
    assert html_theme(client.get("/usage/")) == "dark"

    client.post(THEME, {"theme": "light"})
    assert html_theme(client.get("/")) == "light"
    # The system's again (or anything unknown): the cookie goes.
    response = client.post(THEME, {"theme": "system"})
    assert response.cookies["theme"].value == ""
    assert html_theme(client.get("/")) == "system"
    client.cookies["theme"] = "neon"
    assert html_theme(client.get("/")) == "system"


def test_the_theme_toggle_never_sends_anyone_off_site(client):
    for unsafe in ("https://evil.example/", "//evil.example/", "javascript:alert(1)"):
        response = client.post(THEME, {"theme": "dark", "next": unsafe})
        assert response["Location"] == "/"
    assert client.get(THEME).status_code == 405


def test_the_toggle_is_on_every_page_and_says_what_it_does(client, owner):
    page = client.get("/accounts/login/").content.decode()
    assert f'action="{THEME}"' in page
    assert 'name="theme" value="dark"' in page  # system -> dark -> light -> system
    assert "Colour theme: as the system's. Switch to dark" in page


def test_a_thread_lists_its_owners_chats_beside_it_newest_first(owner_client, owner, other_user):
    now = timezone.now()
    chats = [
        make_conversation(owner, f"Chat {i}", updated_at=now - timedelta(minutes=i))
        for i in range(3)
    ]
    make_conversation(other_user, "Not yours")
    current = chats[1]

    page = owner_client.get(current.get_absolute_url()).content.decode()

    sidebar = page.split('<nav class="sidebar"', 1)[1].split("</nav>", 1)[0]
    assert [f"Chat {i}" in sidebar for i in range(3)] == [True] * 3
    assert sidebar.index("Chat 0") < sidebar.index("Chat 1") < sidebar.index("Chat 2")
    assert "Not yours" not in sidebar
    current_link = f'href="{current.get_absolute_url()}" aria-current="page" class="current"'
    assert current_link in sidebar
    assert sidebar.count('aria-current="page"') == 1
    assert 'role="search"' in sidebar and "+ New chat" in sidebar


def test_the_sidebar_holds_the_newest_forty(owner_client, owner):
    Conversation.objects.bulk_create(
        Conversation(owner=owner, title=f"Bulk {i:02}", updated_at=timezone.now())
        for i in range(45)
    )
    chat = make_conversation(owner, "Mine", updated_at=timezone.now() - timedelta(days=9))
    page = owner_client.get(chat.get_absolute_url()).content.decode()
    sidebar = page.split('<nav class="sidebar"', 1)[1].split("</nav>", 1)[0]
    assert sidebar.count("<li>") == 40
    assert "Mine" not in sidebar  # older than the forty: the list page has it
    assert "All chats →" in sidebar
