"""Screenshots of the chat pages as a person sees them, for a look at the layout.

Starts the product the way the tests do (gunicorn, the real bundled model, a temporary var dir),
signs up a user in Chromium, has a chat of two exchanges (one with code), rates a reply, and saves
PNGs of the list page, the thread page (and on phones its chat menu open), what the model read
for a reply, the usage page and the admin's insights, at desktop (1280x900) and phone (390x844)
sizes, light and dark, into screenshots/ at the repository root (git-ignored). Run it with `make
screenshots`.

Needs Chromium (apt-get install chromium; CHROMIUM_PATH to use another) and Playwright (in
requirements-test.txt).
"""

import argparse
import re
import sys
import tempfile
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests.live_server import CHROMIUM, CHROMIUM_ARGS, Server  # noqa: E402

SIZES = {"desktop": {"width": 1280, "height": 900}, "mobile": {"width": 390, "height": 844}}
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that adds two numbers, in a code block.",
]
USERNAME, PASSWORD = "dana", "correct-Horse-battery-9"
REPLY_MS = 180_000


def wait_for_reply(page) -> None:
    expect(page.locator("li.message.assistant.streaming")).to_have_count(0, timeout=REPLY_MS)
    expect(page.locator("#stop-button")).to_be_hidden(timeout=REPLY_MS)
    expect(page.locator("#send-form button[type=submit]")).to_be_enabled(timeout=REPLY_MS)


def have_a_chat(page) -> str:
    """Sign up, chat for two exchanges; return the thread's path."""
    page.goto("/accounts/signup/")
    page.locator("#id_username").fill(USERNAME)
    page.locator("#id_password1").fill(PASSWORD)
    page.locator("#id_password2").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.locator("#new-chat-form textarea[name=content]").fill(QUESTIONS[0])
    page.get_by_role("button", name="Start chat").click()
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/"))
    expect(page.locator("li.message.assistant")).to_have_count(1, timeout=REPLY_MS)
    wait_for_reply(page)
    for question in QUESTIONS[1:]:
        page.locator("#send-form textarea[name=content]").fill(question)
        page.locator("#send-form button[type=submit]").click()
        expect(page.locator("li.message.user").last).to_have_text(question)
        wait_for_reply(page)
    return re.sub(r"^https?://[^/]+|#.*$", "", page.url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots", help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="chat-screenshots-") as var_dir:
        server = Server(Path(var_dir), env={"CHATBOT_MAX_NEW_TOKENS": "96"})
        server.prepare()
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                context = browser.new_context(base_url=server.url, viewport=SIZES["desktop"])
                page = context.new_page()
                thread = have_a_chat(page)
                page.locator("li.message.assistant").first.get_by_role(
                    "button", name="Good reply"
                ).click()
                context_page = page.locator("a.context-link").last.get_attribute("href")
                login = context.storage_state()
                # The admin's insights need a staff user: the same person, made staff.
                server.manage(
                    "shell",
                    "-c",
                    "from django.contrib.auth.models import User; "
                    f"User.objects.filter(username='{USERNAME}')"
                    ".update(is_staff=True, is_superuser=True)",
                )
                pages = [
                    ("list", "/"),
                    ("thread", thread),
                    ("context", context_page),
                    ("usage", "/usage/"),
                    ("insights", "/admin/insights/"),
                ]
                for (size, viewport), scheme in product(SIZES.items(), ("light", "dark")):
                    phone = size == "mobile"
                    shots = browser.new_context(
                        base_url=server.url,
                        viewport=viewport,
                        storage_state=login,
                        is_mobile=phone,
                        has_touch=phone,
                        device_scale_factor=2 if phone else 1,
                        color_scheme=scheme,
                    )
                    page = shots.new_page()
                    menu = [("thread-menu", f"{thread}#sidebar")] if phone else []
                    for name, path in [*pages, *menu]:
                        page.goto(path)
                        page.wait_for_load_state("networkidle")
                        target = args.out / f"{name}-{size}-{scheme}.png"
                        page.screenshot(path=target)
                        print(target.relative_to(ROOT) if target.is_relative_to(ROOT) else target)
                    shots.close()
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
