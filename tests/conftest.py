import pytest
import torch
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.keys import issue_key
from chatsite.env import env_kernels
from conversations import runtime
from conversations.llm import native
from tests.factories import make_conversation, messages_url
from tests.fakes import FakeEngine

PASSWORD = "a-Long-test-passw0rd"


# The kernel paths the bundled model's engine can take on this machine: ours (as the setting
# chooses them: by default the AVX-512 ones, or the AVX2 ones where torch is limited to AVX2 or
# the CPU has no more; `make test` also names `avx2-vnni`) and torch's alone
# (CHATBOT_NATIVE_KERNELS=false). Where none of ours can run, the setting takes torch's path: that
# one is tested, its fallback included, and once.
KERNEL_SETTING = env_kernels("CHATBOT_NATIVE_KERNELS")
KERNELS_RUN_HERE = native.choose(KERNEL_SETTING) is not None
KERNEL_PATHS = ["ours", "torch"] if KERNELS_RUN_HERE else ["torch"]


def _bundled_engine(**options):
    from django.conf import settings

    from conversations.llm.engine import Engine

    options.setdefault("native_kernels", KERNEL_SETTING)
    engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE, **options)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def default_engine():
    """The bundled model on the product's engine with its default settings (our kernels where
    they run), loaded once for every test that reads it."""
    return _bundled_engine()


@pytest.fixture(scope="session")
def torch_kernels_engine():
    """The bundled model with our own kernels turned off (CHATBOT_NATIVE_KERNELS=false): what
    runs on CPUs that cannot run them, on torch's kernels alone."""
    return _bundled_engine(native_kernels=False)


@pytest.fixture(scope="session", params=KERNEL_PATHS, ids=[f"{p}-kernels" for p in KERNEL_PATHS])
def real_engine(request):
    """The bundled model on each kernel path (KERNEL_PATHS): a test of what the engine does
    runs on each, as some CPU runs it."""
    if request.param == "torch" and KERNELS_RUN_HERE:
        return request.getfixturevalue("torch_kernels_engine")
    return request.getfixturevalue("default_engine")


@pytest.fixture(scope="session")
def fp32_engine():
    """The bundled model in fp32 (no kernels of ours: they are for the bf16 formats)."""
    return _bundled_engine(weights="fp32")


ENGINE_FIXTURES = {"real_engine", "default_engine", "torch_kernels_engine", "fp32_engine"}
# pytest-django's fixtures that give a test the database (or need it, as every fixture that
# depends on them does: fixture names are the test's whole closure).
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences", "live_server"}


def uses_database(item, fixtures) -> bool:
    return bool(DATABASE_FIXTURES & set(fixtures) or item.get_closest_marker("django_db"))


def pytest_collection_modifyitems(items):
    """Tests that run the bundled model in this process are marked `engine`: `make test` runs
    them again with torch limited to AVX2 (the path of a CPU without AVX-512), without the tests
    of fresh processes and servers, which would double its time. Those of them that use no
    database are marked `engine_only` too: the PostgreSQL pass leaves them out. Tests marked
    `postgres` are skipped on SQLite: they share the database with server processes, as hosts
    share one database server (`make test-postgres` runs them)."""
    from django.conf import settings

    on_sqlite = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if ENGINE_FIXTURES & fixtures:
            item.add_marker(pytest.mark.engine)
            if not uses_database(item, fixtures):
                item.add_marker(pytest.mark.engine_only)
        if on_sqlite and item.get_closest_marker("postgres"):
            item.add_marker(
                pytest.mark.skip(
                    reason="needs PostgreSQL: hosts share a database server "
                    "(DATABASE_URL=postgres://...; make test-postgres)"
                )
            )


def pytest_report_header(config):
    return (
        f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
        f"the bundled model's kernel paths: {', '.join(KERNEL_PATHS)}"
    )


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_rate_limits(request):
    """Rate limits count in the database: each test that uses one starts with none used. (A
    transactional test's database is emptied after it, but not the cache's table.)"""
    from django.conf import settings
    from django.core.cache import caches

    if not uses_database(request.node, request.fixturenames):
        return
    # Set up now, not later among the test's fixtures (one marked django_db has it already).
    for name in ("transactional_db", "django_db_reset_sequences", "db"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
            break
    caches[settings.RATE_LIMIT_CACHE].clear()


@pytest.fixture
def fake_engine(settings):
    """Replace the process's engine with FakeEngine for the test. Titles stay the first
    message's (tests of model-written titles turn CHATBOT_AUTO_TITLE back on)."""
    settings.CHATBOT_AUTO_TITLE = False
    engine = FakeEngine()
    previous = runtime.set_engine(engine)
    yield engine
    runtime.set_engine(previous)


@pytest.fixture
def small_engine(settings):
    """A FakeEngine whose prompt budget is 30 tokens (one token per word plus two a message)."""
    settings.CHATBOT_SYSTEM_PROMPT = "Be brief."  # 4 tokens
    engine = FakeEngine(context_window=settings.CHATBOT_MAX_NEW_TOKENS + 30)
    previous = runtime.set_engine(engine)
    yield engine
    runtime.set_engine(previous)


def make_user(username: str):
    return get_user_model().objects.create_user(username=username, password=PASSWORD)


@pytest.fixture
def owner(db):
    return make_user("owner")


@pytest.fixture
def other_user(db):
    return make_user("intruder")


def token_client(user) -> APIClient:
    client = APIClient()
    api_key, key = issue_key(user=user, name="test")
    # As if just used: a key's first use writes its last_used, which query counts would see.
    type(api_key).objects.filter(pk=api_key.pk).update(last_used=timezone.now())
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


@pytest.fixture
def api(owner):
    return token_client(owner)


@pytest.fixture
def other_api(other_user):
    return token_client(other_user)


@pytest.fixture
def anon_api():
    return APIClient()


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture(params=["thread", "start"])
def post_url(request, owner):
    """Both ways to post a message: into a conversation, and /api/messages/."""
    if request.param == "thread":
        return messages_url(make_conversation(owner, "Chat"))
    return "/api/messages/"


@pytest.fixture(autouse=True)
def _plain_static_storage(settings):
    """Pages and the API docs render {% static %}. The production manifest storage needs
    `collectstatic` to have run; tests render against the plain storage instead."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
