"""OpenAI's API under /v1/, driven by OpenAI's own Python client against a live server: the
served model, keys, and errors in OpenAI's shape that the client turns into its own
exception classes."""

import httpx
import openai
import pytest

from accounts.keys import issue_key
from conversations import runtime, services
from conversations.llm.remote import RemoteEngine
from tests.conftest import make_user


@pytest.fixture
def key(transactional_db) -> str:
    _, key = issue_key(user=make_user("sdk"), name="sdk")
    return key


@pytest.fixture
def base_url(live_server) -> str:
    return f"{live_server.url}/v1"


@pytest.fixture
def client(base_url, key):
    """OpenAI's client with the key; closed after the test (its kept-alive connections would
    hold the live server's request threads)."""
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30) as sdk:
        yield sdk


def test_the_served_model_is_listed_and_found_by_its_name(client):
    (served,) = services.served_models()

    listed = client.models.list()

    assert [model.id for model in listed.data] == [served]
    assert listed.data[0].object == "model" and listed.data[0].owned_by
    found = client.models.retrieve(served)
    assert found.id == served and found.created == listed.data[0].created


def test_a_model_named_as_on_the_hub_is_found_by_its_name(client):
    """An inference server's model may be named organisation/model: a slash in the path."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    engine = RemoteEngine(base_url="http://127.0.0.1:9/v1", model=name)  # (named: never asked)
    previous = runtime.set_engine(engine)
    try:
        assert [model.id for model in client.models.list().data] == [name]
        assert client.models.retrieve(name).id == name
    finally:
        runtime.set_engine(previous)
        engine.client.close()


def test_an_unknown_model_raises_the_clients_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-9")
    error = raised.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-9" in error["message"] and error["type"] == "invalid_request_error"


def test_a_wrong_key_raises_the_clients_authentication_error(base_url):
    wrong = openai.OpenAI(base_url=base_url, api_key="not-a-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.status_code == 401
    assert raised.value.body["code"] == "invalid_api_key"


def test_without_a_key_the_answer_asks_for_a_bearer_key(base_url, transactional_db):
    response = httpx.get(f"{base_url}/models", timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["message"] and set(error) == {"message", "type", "param", "code"}


def test_the_products_token_scheme_works_here_too(base_url, key):
    response = httpx.get(f"{base_url}/models", headers={"Authorization": f"Token {key}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("get", "/nothing-here", 404, "unknown_url"),
        ("post", "/models", 405, "method_not_allowed"),
    ],
)
def test_other_errors_are_in_openais_shape(base_url, key, method, path, status, code):
    response = httpx.request(
        method.upper(), f"{base_url}{path}", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
