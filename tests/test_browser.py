"""The product in a real browser (Chromium driven by Playwright) against gunicorn serving the real
bundled model: what a person sees while a reply streams in, stops, is written again, survives a
reload and a new login, is found by search, works without JavaScript, and cannot run a script.

The tests of the JavaScript chat share one person and one chat, in order: sign up and start the
chat (1), stop a reply (2), regenerate it (3), reload and log in again (4), search (5). Each later
step is skipped when the chat it builds on could not be made. The no-JavaScript (6) and XSS (7)
tests start chats of their own.

Without Chromium or Playwright the tests are skipped, unless REQUIRE_BROWSER=1 (as in CI), where
they fail instead.
"""

import contextlib
import os
import re
import time
from pathlib import Path

import pytest
import requests

from tests.live_server import CHROMIUM, CHROMIUM_ARGS, Server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = [pytest.mark.model, pytest.mark.browser]

# The real model writes a few tokens a second on a busy 2-core machine: waits for a whole reply
# are long, every other wait is short.
REPLY_MS = 150_000
UI_MS = 15_000
STOP_MS = 4_000

PASSWORD = "correct-Horse-battery-9"
FRANCE = "What is the capital of France?"
DRAGON = "Write a long story about a dragon."
PREVIOUS, NEXT = "\u2039", "\u203a"  # the version switcher's buttons
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    """Runs first, so a machine without a browser skips before the server starts."""
    if sync_playwright is None:
        _unavailable("Playwright is not installed (pip install -r requirements-test.txt)")
    if not CHROMIUM.exists():
        _unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # (A dozen people sign up from one address within a minute or two here: more than the
    # sign-in limit lets through.)
    env = {"CHATBOT_MAX_NEW_TOKENS": "96", "CHATBOT_LOGINS_PER_MINUTE": "100"}
    server = Server(tmp_path_factory.mktemp("browser"), env=env)
    server.prepare()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Exception as exc:
            _unavailable(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def context(browser, server):
    """The JavaScript-enabled browser of the person who signs up in the first test."""
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(UI_MS)
    yield context
    context.close()


def _csp_violation(message) -> bool:
    """A console message of Chromium's refusing something the Content-Security-Policy forbids."""
    return "Content Security Policy" in message.text


@contextlib.contextmanager
def _watched(page):
    """The page, failing the test afterwards if a script on it threw, or if the browser refused
    anything on it for the Content-Security-Policy (a script, style or handler inline)."""
    errors, violations = [], []
    page.on("pageerror", lambda error: errors.append(error))
    page.on("console", lambda message: _csp_violation(message) and violations.append(message.text))
    try:
        yield page
    finally:
        page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not violations, f"Content-Security-Policy violations: {violations}"


@pytest.fixture
def page(context):
    """A new tab in the first person's browser."""
    with _watched(context.new_page()) as page:
        yield page


@pytest.fixture
def new_browser(browser, server):
    """A browser of someone else (a new context: no cookies); new_browser(**options)."""
    contexts = []

    def make(**options):
        context = browser.new_context(base_url=server.url, **options)
        context.set_default_timeout(UI_MS)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def chat():
    """What the first test made, for the ones after it: username, thread path, texts seen."""
    return {}


def _needs(chat: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in chat]
    if missing:
        pytest.skip(f"builds on an earlier test of this module, which did not get to {missing}")


# What the page shows.


def _streaming_text(page):
    return page.locator("li.message.assistant.streaming .text")


def _wait_for_streamed_text(page, more_than: int = 0) -> str:
    """Wait until the reply being streamed shows more than `more_than` characters, while the Stop
    button is visible and Send is disabled; return the text, read at that same moment."""
    handle = page.wait_for_function(
        """(n) => {
            const text = document.querySelector("li.message.assistant.streaming .text");
            const stop = document.getElementById("stop-button");
            const send = document.querySelector("#send-form button[type=submit]");
            const streaming = !stop.hidden && stop.offsetParent !== null && send.disabled;
            return text && text.textContent.length > n && streaming ? text.textContent : false;
        }""",
        arg=more_than,
        timeout=REPLY_MS,
    )
    return handle.json_value()


def _wait_for_reply_done(page, timeout: int = REPLY_MS) -> None:
    """The stream ended and the page swapped in the server-rendered thread."""
    expect(page.locator("#stop-button")).to_be_hidden(timeout=timeout)
    expect(_streaming_text(page)).to_have_count(0, timeout=timeout)
    expect(page.locator("#send-form button[type=submit]")).to_be_enabled(timeout=timeout)


def _last_reply(page):
    return page.locator("#messages li.message.assistant").last


def _bubbles(page) -> list[str]:
    return [
        " ".join(text.split())
        for text in page.locator("#messages li.message .bubble").all_inner_texts()
    ]


def _letters(text: str) -> str:
    """Only the letters, lowercase: streamed plain text and its Markdown rendering compare."""
    return re.sub(r"[^a-z]", "", text.lower())


def _send(page, content: str) -> None:
    page.locator("#send-form textarea[name=content]").fill(content)
    page.locator("#send-form button[type=submit]").click()


def _sign_up(page, username: str) -> None:
    page.goto("/accounts/signup/")
    page.locator("#id_username").fill(username)
    page.locator("#id_password1").fill(PASSWORD)
    page.locator("#id_password2").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="New chat")).to_be_visible()
    expect(page.get_by_role("button", name=f"Log out {username}")).to_be_visible()


def _start_chat(page, content: str) -> None:
    """From the list page: the first message of a new chat; lands on its thread page."""
    page.goto("/")
    page.locator("#new-chat-form textarea[name=content]").fill(content)
    page.get_by_role("button", name="Start chat").click()
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/(#latest)?$"), timeout=REPLY_MS)


# 1-5: one person, one chat, with JavaScript.


def test_1_sign_up_start_a_chat_and_watch_the_reply_stream_in(page, chat):
    _sign_up(page, "dana")
    chat["username"] = "dana"

    _start_chat(page, FRANCE)
    chat["path"] = re.sub(r"^https?://[^/]+|#.*$", "", page.url)
    expect(page.locator("#messages li.message.user .bubble")).to_have_text(FRANCE)

    # The reply grows while the Stop button is shown.
    first = _wait_for_streamed_text(page)
    second = _wait_for_streamed_text(page, len(first))
    assert len(second) > len(first) > 0
    assert second.startswith(first)

    # Then the server's rendering replaces the streamed text: Markdown, statistics, buttons.
    _wait_for_reply_done(page)
    reply = _last_reply(page)
    expect(reply).to_have_class(re.compile(r"\bstatus-ok\b"))
    expect(reply.locator(".bubble .markdown")).to_contain_text("Paris")
    stats = reply.locator(".stats")
    expect(stats).to_be_visible()
    expect(stats).to_contain_text("SmolLM2-135M-Instruct")
    expect(stats).to_contain_text(re.compile(r"\d+ tokens\s+· [\d.]+ tok/s\s+· [\d.]+ s"))
    expect(reply.locator("a.context-link")).to_have_text("saw 0 earlier messages")
    expect(reply.get_by_role("button", name="Regenerate")).to_be_visible()
    expect(page.locator("#messages li.message.user details.edit summary")).to_have_text("Edit")

    # The chat has a name, on the page and in the tab.
    title = page.locator("#thread-title")
    expect(title).not_to_have_text(re.compile(r"^\s*(Untitled chat)?\s*$"))
    chat["title"] = title.inner_text().strip()
    assert page.title().startswith(chat["title"])
    chat["first_reply"] = reply.locator(".bubble").inner_text()


def test_2_stop_keeps_the_partial_reply(page, chat):
    _needs(chat, "path")
    page.goto(chat["path"])
    _send(page, DRAGON)
    expect(page.locator("#messages li.message.user .bubble").last).to_have_text(DRAGON)

    shown = _wait_for_streamed_text(page, 20)
    page.locator("#stop-button").click()
    stopped_at = time.monotonic()
    _wait_for_reply_done(page, timeout=STOP_MS)
    took = time.monotonic() - stopped_at

    reply = _last_reply(page)
    expect(reply).to_have_class(re.compile(r"\bstatus-cancelled\b"))
    expect(reply.locator(".badge")).to_have_text("Stopped")
    kept = reply.locator(".bubble").inner_text()
    assert _letters(kept).startswith(_letters(shown)[:40]), (shown, kept)
    assert len(_letters(kept)) >= 15, kept
    print(f"the reply ended {took:.1f} s after Stop")
    chat["stopped_reply"] = kept


def test_3_regenerate_writes_a_second_version_and_the_first_stays(page, chat):
    _needs(chat, "path", "stopped_reply")
    page.goto(chat["path"])
    expect(_last_reply(page).locator(".badge")).to_have_text("Stopped")
    _last_reply(page).get_by_role("button", name="Regenerate").click()

    # The old reply goes away and a new one streams in its place.
    first = _wait_for_streamed_text(page)
    _wait_for_streamed_text(page, len(first))
    expect(page.locator("#messages li.message.assistant")).to_have_count(2)
    _wait_for_reply_done(page)

    reply = _last_reply(page)
    expect(reply).to_have_class(re.compile(r"\bstatus-ok\b"))
    expect(reply.locator(".versions")).to_contain_text("2 / 2")
    expect(reply.locator(".badge")).to_have_count(0)
    second_version = reply.locator(".bubble").inner_text()
    assert second_version.strip()

    reply.get_by_role("button", name=PREVIOUS, exact=True).click()
    reply = _last_reply(page)
    expect(reply.locator(".versions")).to_contain_text("1 / 2")
    expect(reply.locator(".bubble")).to_have_text(chat["stopped_reply"])
    expect(reply.locator(".badge")).to_have_text("Stopped")

    reply.get_by_role("button", name=NEXT, exact=True).click()
    reply = _last_reply(page)
    expect(reply.locator(".versions")).to_contain_text("2 / 2")
    expect(reply.locator(".bubble")).to_have_text(second_version)
    chat["second_version"] = second_version


def test_4_the_history_survives_a_reload_and_a_new_login(page, chat):
    _needs(chat, "path", "username", "second_version")
    page.goto(chat["path"])
    history = _bubbles(page)
    assert len(history) == 4, history
    assert history[0] == FRANCE
    assert "Paris" in history[1]
    assert history[2] == DRAGON
    assert history[3] == " ".join(chat["second_version"].split())

    page.reload()
    assert _bubbles(page) == history
    expect(page.locator("#thread-title")).to_have_text(chat["title"])

    page.get_by_role("button", name=f"Log out {chat['username']}").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.goto(chat["path"])  # no longer visible to a visitor
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    assert "/accounts/login/" in page.url

    page.goto("/accounts/login/")
    page.locator("#id_username").fill(chat["username"])
    page.locator("#id_password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Your chats")).to_be_visible()
    link = page.locator(f'.conversation-list a[href="{chat["path"]}"]')
    expect(link).to_contain_text(chat["title"])
    # (The count there includes the earlier version of the reply: 4 shown, 5 stored.)
    expect(link).to_contain_text(re.compile(r"\b[45] messages"))
    link.click()
    expect(page.locator("#thread-title")).to_have_text(chat["title"])
    assert _bubbles(page) == history


def test_5_search_finds_the_chat_with_a_highlighted_snippet(page, chat):
    _needs(chat, "path")
    page.goto("/")
    search = page.get_by_role("textbox", name="Search your chats")
    search.fill("dragon")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"\?q=dragon$"))

    result = page.locator(".conversation-list li").filter(
        has=page.locator(f'a[href="{chat["path"]}"]')
    )
    expect(result).to_have_count(1)
    expect(result.locator(".snippet mark").first).to_have_text(re.compile("dragon", re.I))
    expect(page.locator(".search-form .muted")).to_contain_text("1 chat matches “dragon”")
    expect(page.get_by_role("link", name="Show all chats")).to_be_visible()

    expect(search).to_have_value("dragon")
    search.fill("qzxwvtplk")
    search.press("Enter")
    expect(page.locator("p.empty")).to_have_text("No chats match “qzxwvtplk”.")
    expect(page.locator(".conversation-list")).to_have_count(0)


def test_5b_a_reply_opens_what_the_model_read_and_takes_thumbs_and_a_comment(page, chat):
    """The last reply's "saw N earlier messages" opens its context: the system prompt, then the
    earlier exchange (France and its answer), then the question it answered. Thumbs and a comment
    are kept across a reload; the chosen thumb pressed again takes the rating back."""
    _needs(chat, "path")
    page.goto(chat["path"])
    reply = _last_reply(page)
    reply.get_by_role("link", name=re.compile(r"saw 2 earlier messages")).click()
    expect(page.get_by_role("heading", name="What the model read")).to_be_visible()
    items = page.locator(".context-view > li")
    expect(items).to_have_count(4)  # system prompt, France, its answer, the dragon question
    expect(items.nth(0)).to_contain_text("System prompt")
    expect(items.nth(1)).to_contain_text(FRANCE)
    expect(items.nth(2)).to_contain_text("Paris")
    expect(items.nth(3)).to_contain_text(DRAGON)
    page.get_by_role("link", name="← Back to the chat").click()

    def pressed(name: str) -> None:
        expect(_thumb(page, name)).to_have_attribute("aria-pressed", "true")

    def not_pressed(name: str) -> None:
        expect(_thumb(page, name)).to_have_attribute("aria-pressed", "false")

    not_pressed("Bad reply")
    _thumb(page, "Bad reply").click()
    pressed("Bad reply")
    expect(page.get_by_role("alert")).to_contain_text("feedback is saved")

    comment = _last_reply(page).get_by_label("What was good or bad about this reply?")
    _last_reply(page).locator(".feedback-comment summary").click()
    comment.fill("Too long.")
    _last_reply(page).get_by_role("button", name="Save with 👍").click()
    page.reload()
    pressed("Good reply")
    not_pressed("Bad reply")
    expect(comment).to_have_value("Too long.")

    _thumb(page, "Good reply").click()
    not_pressed("Good reply")
    expect(_last_reply(page).locator(".feedback-comment")).not_to_have_attribute("open", "")


def _thumb(page, name: str):
    return _last_reply(page).get_by_role("button", name=name)


# 6-7: chats of their own.


def test_6_without_javascript_a_message_is_sent_by_a_form_post(new_browser):
    with _watched(new_browser(java_script_enabled=False)) as page:
        _sign_up(page, "erin")
        page.locator("#new-chat-form textarea[name=content]").fill(FRANCE)
        # The post waits for the whole reply, then redirects to the thread (the click waits for
        # that navigation too).
        with page.expect_navigation(url=re.compile(r"/c/[0-9a-f-]{36}/"), timeout=REPLY_MS):
            page.get_by_role("button", name="Start chat").click(timeout=REPLY_MS)
        expect(page.locator("#messages li.message.user .bubble")).to_have_text(FRANCE)
        reply = _last_reply(page)
        expect(reply).to_have_class(re.compile(r"\bstatus-ok\b"))
        expect(reply.locator(".bubble")).to_contain_text("Paris")
        expect(page.locator("#stop-button")).to_be_hidden()

        # A follow-up from the thread page's own form.
        page.locator("#send-form textarea[name=content]").fill("Thank you!")
        with page.expect_navigation(url=re.compile(r"#latest$"), timeout=REPLY_MS):
            page.locator("#send-form button[type=submit]").click(timeout=REPLY_MS)
        history = _bubbles(page)
        assert len(history) == 4, history
        assert history[2] == "Thank you!"
        reply = _last_reply(page)
        expect(reply).to_have_class(re.compile(r"\bstatus-ok\b"))
        expect(reply.locator("a.context-link")).to_have_text("saw 2 earlier messages")
        assert history[3]
        assert page.locator("#latest").count() == 1


def test_7_html_in_a_message_is_shown_as_text_and_never_runs(new_browser):
    with _watched(new_browser()) as page:
        _shows_html_as_text(page)


def _shows_html_as_text(page):
    _sign_up(page, "frank")
    _start_chat(page, XSS)
    _wait_for_reply_done(page)
    expect(_last_reply(page)).to_have_class(re.compile(r"\bstatus-ok\b"))

    question = page.locator("#messages li.message.user .bubble")
    expect(question).to_have_text(XSS)
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"

    # The thread rendered by the server itself (not swapped in by the script), and the list.
    page.reload()
    expect(question).to_have_text(XSS)
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    page.goto("/")
    expect(page.locator(".conversation-list li")).to_have_count(1)
    assert page.evaluate("typeof window.__xss") == "undefined"


# Markup in a reply: the model's text goes through Markdown, so the tricks differ from a user's.
MODEL_XSS = (
    '<script>window.__xss=3</script> <img src=x onerror="window.__xss=4"> '
    "[click me](javascript:window.__xss=5) ![picture](javascript:window.__xss=6) "
    '<a href="javascript:window.__xss=7">raw link</a> <svg onload="window.__xss=8"></svg> '
    "[data](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX194c3M9OTwvc2NyaXB0Pg==) "
    '<iframe src="javascript:window.__xss=10"></iframe> '
    "[ok](https://example.test/page) **bold**"
)


def test_8_markup_in_a_reply_is_shown_inert(new_browser, server):
    with _watched(new_browser()) as page:
        _sign_up(page, "grace")
        # A stored reply with every trick in it, as if the model had written it.
        server.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            "from conversations import services; from conversations.models import Message; "
            "user = get_user_model().objects.get(username='grace'); "
            "chat = services.create_conversation(owner=user, title='Tricks'); "
            "question = Message.objects.create(conversation=chat, role='user', content='Hi'); "
            f"Message.objects.create(conversation=chat, role='assistant', content={MODEL_XSS!r}, "
            "reply_to=question)",
        )
        page.goto("/")
        page.get_by_role("link", name=re.compile("Tricks")).click()
        reply = page.locator("#messages li.message.assistant .bubble")
        expect(reply).to_contain_text("click me")
        expect(reply.locator("strong")).to_have_text("bold")
        assert reply.locator("script, img, svg, iframe").count() == 0
        hrefs = [link.get_attribute("href") or "" for link in reply.locator("a").all()]
        assert "https://example.test/page" in hrefs
        assert not [h for h in hrefs if h.lower().startswith(("javascript:", "data:"))], hrefs
        for name in ("click me", "raw link", "data"):  # whatever is left of them, clicked
            for element in reply.get_by_text(name, exact=True).all():
                element.click(no_wait_after=True)
        assert page.evaluate("typeof window.__xss") == "undefined"


def test_9_no_page_breaks_the_content_security_policy(new_browser, server):
    """Every kind of page, the API docs and admin included, under the strict policy: the
    console shows no refusal (checked by _watched) and the pages' scripts still run."""
    with _watched(new_browser()) as page:
        page.goto("/accounts/login/")
        page.goto("/accounts/signup/")
        _sign_up(page, "heidi")
        server.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            "from conversations import services; from conversations.models import Message; "
            "user = get_user_model().objects.get(username='heidi'); "
            "user.is_staff = user.is_superuser = True; user.save(); "
            "chat = services.create_conversation(owner=user, title='Headers'); "
            "question = Message.objects.create(conversation=chat, role='user', content='Hi'); "
            "Message.objects.create(conversation=chat, role='assistant', content='**Hello**', "
            "reply_to=question)",
        )
        page.goto("/")
        page.get_by_role("link", name=re.compile("Headers")).click()
        expect(_last_reply(page).locator("strong")).to_have_text("Hello")
        thread = page.url
        page.goto(thread + "settings/")
        page.goto(thread + "delete/")
        page.goto("/?q=hello")
        page.goto("/keys/")
        page.goto("/usage/")
        page.goto("/admin/insights/")
        expect(page.locator("svg").first).to_be_visible()
        page.goto("/api/docs/")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Chat API")
        page.goto("/admin/")
        page.goto("/admin/conversations/conversation/")
        page.get_by_role("link", name="Headers").click()
        expect(page.locator("#content h2, #content h1").first).to_be_visible()
        page.goto("/admin/conversations/message/")


def test_10_a_key_made_on_the_keys_page_opens_the_api_until_it_is_revoked(new_browser, server):
    with _watched(new_browser()) as page:
        _sign_up(page, "ivan")
        page.get_by_role("link", name="API keys").click()
        page.get_by_label("Name").fill("my script")
        page.get_by_role("button", name="Create a key").click()
        key = page.locator("#new-key").inner_text().strip()

        api = f"{server.url}/api/conversations/"
        bearer = {"Authorization": f"Bearer {key}"}
        assert requests.get(api, headers=bearer, timeout=UI_MS / 1000).status_code == 200

        page.goto("/keys/")
        expect(page.locator("#new-key")).to_have_count(0)
        row = page.locator(".key-list tr", has_text="my script").first
        expect(row).to_contain_text(key[:8])
        expect(row).not_to_contain_text("never")  # it was used
        row.get_by_role("button", name="Revoke my script").click()
        expect(page.get_by_role("alert")).to_contain_text("Revoked")
        assert requests.get(api, headers=bearer, timeout=UI_MS / 1000).status_code == 401


# 11-15: the chat UI people expect: theme, the chat list beside a thread, copy buttons, keys,
# and an automated accessibility check.


def _stored_chat(server, username: str, title: str, reply: str) -> None:
    """A chat of `username`'s with one question and `reply`, as if the model had written it."""
    server.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        "from conversations import services; from conversations.models import Message; "
        f"user = get_user_model().objects.get(username={username!r}); "
        f"chat = services.create_conversation(owner=user, title={title!r}); "
        "question = Message.objects.create(conversation=chat, role='user', content='Hi'); "
        f"Message.objects.create(conversation=chat, role='assistant', content={reply!r}, "
        "reply_to=question, context_turns=0, "
        "context={'system_prompt': chat.system_prompt, 'messages': [], 'dropped': 0})",
    )


def _background(page) -> str:
    return page.evaluate("getComputedStyle(document.body).backgroundColor")


LIGHT_BG, DARK_BG = "rgb(246, 247, 249)", "rgb(18, 21, 27)"


def test_11_dark_mode_follows_the_system_and_the_toggle_is_remembered(new_browser):
    with _watched(new_browser(color_scheme="dark")) as page:
        _sign_up(page, "judy")
        assert page.evaluate("document.documentElement.dataset.theme") == "system"
        assert _background(page) == DARK_BG  # the system's dark

        toggle = page.get_by_role("button", name=re.compile("Colour theme"))
        toggle.click()  # system -> dark
        expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        page.get_by_role("button", name=re.compile("Colour theme")).click()  # dark -> light
        expect(page.locator("html")).to_have_attribute("data-theme", "light")
        assert _background(page) == LIGHT_BG  # chosen over the system's dark
        page.reload()
        expect(page.locator("html")).to_have_attribute("data-theme", "light")
        page.goto("/usage/")
        assert _background(page) == LIGHT_BG
        page.get_by_role("button", name=re.compile("Colour theme")).click()  # back to the system
        expect(page.locator("html")).to_have_attribute("data-theme", "system")
        assert _background(page) == DARK_BG


def test_12_the_chat_list_is_beside_a_thread_and_a_menu_on_phones(new_browser, server):
    with _watched(new_browser(viewport={"width": 1280, "height": 900})) as page:
        _sign_up(page, "karl")
        for title in ("Older chat", "Newer chat"):
            _stored_chat(server, "karl", title, "Hello.")
        page.goto("/")
        page.get_by_role("link", name=re.compile("Older chat")).click()
        sidebar = page.get_by_role("navigation", name="Your chats")
        expect(sidebar).to_be_visible()
        links = sidebar.locator(".sidebar-list a")
        expect(links).to_have_text(["Older chat", "Newer chat"][::-1])  # newest first
        expect(sidebar.locator('a[aria-current="page"]')).to_have_text("Older chat")
        expect(sidebar.get_by_role("link", name="+ New chat")).to_be_visible()
        sidebar.get_by_role("searchbox", name="Search your chats").fill("newer")
        sidebar.get_by_role("searchbox", name="Search your chats").press("Enter")
        page.wait_for_url(re.compile(r"\?q=newer$"))
        page.go_back()

        page.set_viewport_size({"width": 390, "height": 844})
        expect(sidebar).to_be_hidden()
        page.get_by_role("link", name="☰ Chats").click()
        expect(sidebar).to_be_visible()
        expect(sidebar.locator('a[aria-current="page"]')).to_have_text("Older chat")
        sidebar.get_by_role("link", name="Close the list of chats").click()
        expect(sidebar).to_be_hidden()


def test_13_copy_buttons_copy_a_code_block_and_a_whole_reply(new_browser, server):
    page = new_browser()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    with _watched(page):
        _sign_up(page, "lena")
        code = 'def add(a, b):\n    return a + b  # "sum" < 3'
        _stored_chat(server, "lena", "Code", f"Here:\n\n```python\n{code}\n```\n\nDone.")
        page.goto("/")
        page.get_by_role("link", name=re.compile("Code")).click()
        reply = _last_reply(page)
        reply.get_by_role("button", name="Copy this code").click()
        expect(reply.get_by_role("button", name="Copy this code")).to_have_text("Copied ✓")
        assert page.evaluate("navigator.clipboard.readText()").strip() == code
        reply.get_by_role("button", name="Copy this reply").click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied.startswith("Here:") and "return a + b" in copied and "Done." in copied


def test_14_esc_stops_a_streaming_reply_and_keyboard_shortcuts_work(new_browser, server):
    """A short window, so the thread scrolls: the page follows the reply being written until
    the person scrolls up, then offers "Jump to latest"; Esc stops the reply. (The story may be
    long, so that it is still being written meanwhile.)"""
    with _watched(new_browser(viewport={"width": 800, "height": 420})) as page:
        _sign_up(page, "mona")
        _start_chat(page, FRANCE)
        _wait_for_reply_done(page)
        server.manage(
            "shell",
            "-c",
            "from conversations.models import Conversation; "
            "Conversation.objects.filter(owner__username='mona').update(max_new_tokens=1000)",
        )
        _send(page, DRAGON)
        _wait_for_streamed_text(page, 20)
        jump = page.get_by_role("button", name="Jump to latest")
        expect(jump).to_be_hidden()
        page.evaluate("window.scrollTo(0, 0)")
        expect(jump).to_be_visible()
        jump.click()
        expect(jump).to_be_hidden()
        assert page.evaluate(
            "window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 120"
        )
        page.keyboard.press("Escape")
        _wait_for_reply_done(page, timeout=STOP_MS)
        reply = _last_reply(page)
        expect(reply).to_have_class(re.compile(r"\bstatus-cancelled\b"))
        expect(reply.locator(".badge")).to_have_text("Stopped")

        # Shift+Enter writes a new line; Ctrl+Shift+O opens a new chat, its box focused.
        box = page.locator("#send-form textarea[name=content]")
        box.focus()
        box.type("one")
        box.press("Shift+Enter")
        box.type("two")
        expect(box).to_have_value("one\ntwo")
        page.keyboard.press("Control+Shift+O")
        page.wait_for_url(re.compile(r"/#new-chat-form$"))
        expect(page.locator("#new-chat-form textarea[name=content]")).to_be_focused()


AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"


def _serious_violations(page) -> list[str]:
    """axe-core's violations of impact serious or critical on the page, one line each."""
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['html'][:120] for n in v['nodes']][:3]}"
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_15_the_pages_pass_an_automated_accessibility_check(browser, server, scheme):
    """axe-core (vendored through npm, loaded into the page: the policy is bypassed for it
    alone) finds nothing serious on the pages a person uses, in light and dark."""
    if not AXE.exists():
        _unavailable(f"axe-core is not installed at {AXE} (npm ci)")
    context = browser.new_context(base_url=server.url, bypass_csp=True, color_scheme=scheme)
    context.set_default_timeout(UI_MS)
    page = context.new_page()
    try:
        username = f"nina{scheme}"
        page.goto("/accounts/login/")
        problems = {"login": _serious_violations(page)}
        _sign_up(page, username)
        code = "print('hi')"
        _stored_chat(server, username, "Checked", f"Sure:\n\n```python\n{code}\n```")
        page.goto("/")
        problems["list"] = _serious_violations(page)
        page.get_by_role("link", name=re.compile("Checked")).click()
        problems["thread"] = _serious_violations(page)
        page.locator("a.context-link").first.click()
        expect(page.get_by_role("heading", name="What the model read")).to_be_visible()
        problems["context"] = _serious_violations(page)
        page.goto("/usage/")
        problems["usage"] = _serious_violations(page)
        page.goto("/keys/")
        problems["keys"] = _serious_violations(page)
        found = {name: found for name, found in problems.items() if found}
        assert not found, "\n".join(
            f"{name}: {line}" for name, lines in found.items() for line in lines
        )
    finally:
        context.close()
