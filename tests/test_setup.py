"""Settings from the environment, the lazy model seam, and the terminal chat command."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from conversations.models import Conversation, Message

ROOT = Path(__file__).resolve().parent.parent


def environment_without_settings() -> dict:
    """This process's environment without the product's settings, for a child to start from
    (the database's too: a run on PostgreSQL sets DATABASE_URL)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DJANGO_", "CHATBOT_", "DATABASE_")) and name != "WEB_CONCURRENCY"
    }


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    settings_module = {"DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environment_without_settings(), **settings_module, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


SHOW_SETTINGS = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "db": str(settings.DATABASES["default"]["NAME"]),
    "engine": settings.DATABASES["default"]["ENGINE"],
    "debug": settings.DEBUG,
    "hosts": settings.ALLOWED_HOSTS,
    "cors": settings.CORS_ALLOWED_ORIGINS,
    "secret": settings.SECRET_KEY,
    "model": settings.CHATBOT_MODEL,
    "cache": str(settings.CHATBOT_MODEL_CACHE),
    "max_new_tokens": settings.CHATBOT_MAX_NEW_TOKENS,
    "temperature": settings.CHATBOT_TEMPERATURE,
}))
"""


def test_defaults_work_without_configuration(tmp_path):
    result = run_python(SHOW_SETTINGS, {"CHATBOT_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["engine"] == "django.db.backends.sqlite3"
    assert shown["db"] == str(tmp_path / "db.sqlite3")
    assert shown["debug"] is False
    assert shown["hosts"] == ["127.0.0.1", "localhost"]
    assert shown["cors"] == []
    assert shown["model"] == ""
    assert shown["cache"] == str(tmp_path / "models")
    assert shown["max_new_tokens"] == 256
    assert shown["temperature"] == 0.0
    # A local secret key is generated once and kept.
    assert (tmp_path / "secret_key").read_text().strip() == shown["secret"]
    again = json.loads(run_python(SHOW_SETTINGS, {"CHATBOT_VAR_DIR": str(tmp_path)}).stdout)
    assert again["secret"] == shown["secret"]


def test_environment_overrides_the_defaults(tmp_path):
    env = {
        "CHATBOT_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}",
        "DJANGO_DEBUG": "true",
        "DJANGO_ALLOWED_HOSTS": "chat.example.test, localhost",
        "DJANGO_SECRET_KEY": "from-the-environment",
        "CORS_ALLOWED_ORIGINS": "https://a.example.test,https://b.example.test",
        "CHATBOT_MODEL": "/models/blenderbot",
        "CHATBOT_MAX_NEW_TOKENS": "64",
        "CHATBOT_TEMPERATURE": "0.7",
    }
    shown = json.loads(run_python(SHOW_SETTINGS, env).stdout)
    assert shown["db"] == str(tmp_path / "other.db")
    assert shown["debug"] is True
    assert shown["hosts"] == ["chat.example.test", "localhost"]
    assert shown["secret"] == "from-the-environment"
    assert shown["cors"] == ["https://a.example.test", "https://b.example.test"]
    assert shown["model"] == "/models/blenderbot"
    assert shown["max_new_tokens"] == 64
    assert shown["temperature"] == 0.7
    assert not (tmp_path / "secret_key").exists()


PRODUCTION = {
    "DJANGO_SECRET_KEY": "a-production-key-" + "x" * 50,
    "DJANGO_ALLOWED_HOSTS": "chat.example.test",
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "DJANGO_SESSION_COOKIE_SECURE": "true",
    "DJANGO_CSRF_COOKIE_SECURE": "true",
}
CHECK_DEPLOY = """
import sys, django
from django.core.management import call_command
django.setup()
call_command("check", deploy=True, fail_level="WARNING")
"""


def test_a_production_environment_passes_the_deployment_check(tmp_path):
    result = run_python(CHECK_DEPLOY, {"CHATBOT_VAR_DIR": str(tmp_path), **PRODUCTION})
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout + result.stderr


def test_the_local_defaults_are_flagged_by_the_deployment_check(tmp_path):
    result = run_python(CHECK_DEPLOY, {"CHATBOT_VAR_DIR": str(tmp_path)})
    assert result.returncode != 0
    for warning in ("W004", "W008", "W012", "W016"):  # HSTS, SSL redirect, cookies
        assert warning in result.stderr


def test_a_server_for_other_hosts_refuses_to_start_without_a_secret_key(tmp_path):
    env = {**PRODUCTION, "CHATBOT_VAR_DIR": str(tmp_path), "DJANGO_SECRET_KEY": ""}
    result = run_python(SHOW_SETTINGS, env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr
    assert "chat.example.test" in result.stderr
    assert not (tmp_path / "secret_key").exists()


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("CHATBOT_BATCH_SIZE", "x", "CHATBOT_BATCH_SIZE must be a whole number, got 'x'"),
        ("CHATBOT_MAX_IMPORT_MB", "2.5", "CHATBOT_MAX_IMPORT_MB must be a whole number, got '2.5'"),
        ("DJANGO_DEBUG", "ture", "DJANGO_DEBUG must be true or false"),
        ("CHATBOT_AUTO_TITLE", "nope", "got 'nope'"),
        ("CHATBOT_TEMPERATURE", "warm", "CHATBOT_TEMPERATURE must be a number, got 'warm'"),
        ("CHATBOT_TOP_P", "nan", "CHATBOT_TOP_P must be a number, got 'nan'"),
    ],
)
def test_a_setting_the_server_cannot_read_stops_it_naming_the_variable(
    tmp_path, variable, value, said
):
    result = run_python(SHOW_SETTINGS, {"CHATBOT_VAR_DIR": str(tmp_path), variable: value})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert said in result.stderr


def gunicorn_config(env: dict, *args: str) -> subprocess.CompletedProcess:
    """gunicorn reading the product's config file, as `make run` starts it."""
    gunicorn = Path(sys.executable).parent / "gunicorn"
    return subprocess.run(
        [str(gunicorn), "--config", "chatsite/gunicorn.conf.py", *args, "chatsite.wsgi"],
        cwd=ROOT,
        env={**environment_without_settings(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("CHATBOT_BATCH_SIZE", "8x", "CHATBOT_BATCH_SIZE must be a whole number, got '8x'"),
        ("CHATBOT_WEB_THREADS", "many", "CHATBOT_WEB_THREADS must be a whole number, got 'many'"),
    ],
)
def test_gunicorns_config_names_a_variable_it_cannot_read(tmp_path, variable, value, said):
    result = gunicorn_config({"CHATBOT_VAR_DIR": str(tmp_path), variable: value}, "--check-config")

    assert result.returncode != 0
    assert said in result.stderr


def test_gunicorn_gives_each_reply_of_a_full_batch_a_thread_and_as_many_more(tmp_path):
    result = gunicorn_config(
        {"CHATBOT_VAR_DIR": str(tmp_path), "CHATBOT_BATCH_SIZE": "3", "WEB_CONCURRENCY": "2"},
        "--print-config",
    )

    assert result.returncode == 0, result.stderr
    lines = [line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line]
    printed = {name.strip(): value.strip() for name, value in lines}
    assert printed["threads"] == "6"
    assert printed["workers"] == "2"


SHOW_READ_SETTINGS = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "import_bytes": settings.CHATBOT_MAX_IMPORT_BYTES,
    "debug": settings.DEBUG,
    "auto_title": settings.CHATBOT_AUTO_TITLE,
}))
"""


def test_settings_read_their_values_from_the_environment(tmp_path):
    base = {"CHATBOT_VAR_DIR": str(tmp_path)}
    default = json.loads(run_python(SHOW_READ_SETTINGS, base).stdout)
    env = {
        **base,
        "CHATBOT_MAX_IMPORT_MB": "12",
        "DJANGO_DEBUG": "Yes",
        "CHATBOT_AUTO_TITLE": "off",
    }
    shown = json.loads(run_python(SHOW_READ_SETTINGS, env).stdout)

    assert default == {"import_bytes": 5 * 1024 * 1024, "debug": False, "auto_title": True}
    assert shown == {"import_bytes": 12 * 1024 * 1024, "debug": True, "auto_title": False}


def test_security_headers_and_cookies_follow_the_settings(client, settings, django_user_model):
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_SSL_REDIRECT = True
    django_user_model.objects.create_user("ada", password="Sturdy-Passw0rd-42")

    assert client.get("/accounts/login/").status_code == 301, "plain HTTP is redirected"
    page = client.get("/accounts/login/", secure=True)
    assert page["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"
    assert page.cookies["csrftoken"]["secure"]
    token = page.cookies["csrftoken"].value
    login = client.post(
        "/accounts/login/",
        {"username": "ada", "password": "Sturdy-Passw0rd-42", "csrfmiddlewaretoken": token},
        secure=True,
    )
    assert login.status_code == 302
    assert login.cookies["sessionid"]["secure"]


def test_migrate_and_the_web_layer_never_import_torch(tmp_path):
    code = """
import sys, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
import chatsite.urls, conversations.admin, conversations.api.views, conversations.pages.chats
import conversations.services, conversations.runtime
from django.test import Client
import conversations.pages.thread, conversations.pages.exports, conversations.search
assert Client().get("/accounts/login/").status_code == 200
assert Client().get("/api/conversations/").status_code == 401
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("heavy:", heavy)
"""
    env = {
        "CHATBOT_VAR_DIR": str(tmp_path),
        "DJANGO_ALLOWED_HOSTS": "testserver",
        "DJANGO_DEBUG": "true",  # static URLs without a collectstatic manifest
    }
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


def test_a_fresh_var_dir_and_its_database_are_private(tmp_path):
    """The database holds sessions and key digests: only the server's user may read it."""
    var = tmp_path / "var"
    code = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
"""
    result = run_python(code, {"CHATBOT_VAR_DIR": str(var)})
    assert result.returncode == 0, result.stderr
    modes = {path.name: path.stat().st_mode & 0o777 for path in [var, *var.iterdir()]}
    assert modes["var"] == 0o700
    assert modes["db.sqlite3"] == 0o600
    assert modes["secret_key"] == 0o600
    # SQLite's write-ahead log and shared memory, if left, are as private as the database.
    assert {modes[name] for name in modes if name.startswith("db.sqlite3-")} <= {0o600}


def test_an_existing_database_readable_by_others_is_made_private(tmp_path):
    (tmp_path / "db.sqlite3").touch(mode=0o644)
    (tmp_path / "db.sqlite3").chmod(0o644)
    tmp_path.chmod(0o755)
    result = run_python("import django; django.setup()", {"CHATBOT_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "db.sqlite3").stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode & 0o777 == 0o755, "a directory the operator chose is theirs"


def test_sqlite_runs_in_wal_mode(db):
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's journal mode; this run's database is not SQLite")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        mode = cursor.fetchone()[0]
    # The test database is in memory, where SQLite reports "memory"; on disk it is WAL.
    assert mode in {"wal", "memory"}


def test_sqlite_file_database_uses_wal(tmp_path):
    code = """
import django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("PRAGMA journal_mode")
    print(cursor.fetchone()[0])
"""
    result = run_python(code, {"CHATBOT_VAR_DIR": str(tmp_path)})
    assert result.stdout.strip() == "wal", result.stderr


@pytest.fixture
def terminal_input(monkeypatch):
    def feed(text: str):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


def test_chat_command_stores_turns_like_any_conversation(db, fake_engine, terminal_input):
    terminal_input("hello there\n   \nsecond message\n/quit\n")
    out, err = io.StringIO(), io.StringIO()
    call_command("chat", "--user", "carol", stdout=out, stderr=err)
    conversation = Conversation.objects.get(owner__username="carol")
    assert list(conversation.messages.values_list("role", "content")) == [
        ("user", "hello there"),
        ("assistant", "Echo: hello there"),
        ("user", "second message"),
        ("assistant", "Echo: second message"),
    ]
    assert "bot> Echo: second message" in out.getvalue()
    assert "must not be empty" in err.getvalue()
    assert f"--conversation {conversation.pk}" in out.getvalue()
    # The second message's context held the first exchange.
    assert [m["content"] for m in fake_engine.calls[1]][1:3] == ["hello there", "Echo: hello there"]


def test_chat_command_continues_a_conversation(db, owner, fake_engine, terminal_input):
    conversation = Conversation.objects.create(owner=owner, title="t")
    Message.objects.create(conversation=conversation, role="user", content="earlier question")
    Message.objects.create(conversation=conversation, role="assistant", content="earlier answer")
    terminal_input("follow-up\n")  # then end of input
    out = io.StringIO()
    call_command("chat", "--conversation", str(conversation.pk), stdout=out)
    assert "you> earlier question" in out.getvalue()
    assert "bot> earlier answer" in out.getvalue()
    assert conversation.messages.count() == 4
    assert conversation.messages.order_by("created_at").last().context_turns == 2


def test_chat_command_rejects_unknown_or_foreign_conversations(db, owner, other_user):
    with pytest.raises(CommandError, match="No conversation"):
        call_command("chat", "--conversation", "not-a-uuid")
    conversation = Conversation.objects.create(owner=owner)
    with pytest.raises(CommandError, match="does not belong"):
        call_command("chat", "--conversation", str(conversation.pk), "--user", other_user.username)


SHOW_ENGINE_MEMORY = """
import json, django
django.setup()
from conversations.runtime import get_engine
engine = get_engine()  # built, not loaded
print(json.dumps([engine.prefix_cache_bytes, engine.batch_bytes, engine.token_cache_bytes]))
"""


def test_the_engine_gets_its_memory_bounds_from_the_environment(tmp_path):
    env = {"CHATBOT_VAR_DIR": str(tmp_path)}
    shown = json.loads(run_python(SHOW_ENGINE_MEMORY, env).stdout)
    assert shown == [256 * 2**20, 512 * 2**20, 32 * 2**20]
    env |= {
        "CHATBOT_PREFIX_CACHE_MB": "64",
        "CHATBOT_BATCH_MEMORY_MB": "1024",
        "CHATBOT_TOKEN_CACHE_MB": "8",
    }
    shown = json.loads(run_python(SHOW_ENGINE_MEMORY, env).stdout)
    assert shown == [64 * 2**20, 1024 * 2**20, 8 * 2**20]
