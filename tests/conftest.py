import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conversations import runtime
from tests.fakes import FakeEngine

PASSWORD = "a-Long-test-passw0rd"


@pytest.fixture(scope="session")
def real_engine():
    """The bundled model on the product's engine, loaded once for every test that reads it."""
    from django.conf import settings

    from conversations.llm.engine import Engine

    engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def torch_kernels_engine():
    """The bundled model with our own kernels turned off (CHATBOT_NATIVE_KERNELS=false): what
    runs on CPUs that cannot run them, on torch's kernels alone."""
    from django.conf import settings

    from conversations.llm.engine import Engine

    engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE, native_kernels=False)
    engine.load()
    return engine


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Rate limits count in the cache: each test starts with none used."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def fake_engine(settings):
    """Replace the process's engine with FakeEngine for the test. Titles stay the first
    message's (tests of model-written titles turn CHATBOT_AUTO_TITLE back on)."""
    settings.CHATBOT_AUTO_TITLE = False
    engine = FakeEngine()
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
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
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


@pytest.fixture(autouse=True)
def _plain_static_storage(settings):
    """Pages and the API docs render {% static %}. The production manifest storage needs
    `collectstatic` to have run; tests render against the plain storage instead."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
