"""OpenAI's Responses and Conversations APIs (/v1/responses, /v1/conversations) driven by
OpenAI's own Python client against a live server: stored state, the context rebuilt from the
database, the event stream the SDK's strict `responses.stream()` helper reads, and the same
rows through the product's API."""

import json

import httpx
import openai
import pytest
from django.test import Client

from accounts.keys import issue_key
from conversations import services
from conversations.models import Conversation, Message
from tests.conftest import PASSWORD, make_user
from tests.test_openai_chat import stored

EVENT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def user(transactional_db):
    return make_user("sdk")


@pytest.fixture
def key(user) -> str:
    return issue_key(user=user, name="sdk")[1]


@pytest.fixture
def client(live_server, key):
    """OpenAI's client with the key; closed after the test (its kept-alive connections would
    hold the live server's request threads)."""
    with openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=60
    ) as sdk:
        yield sdk


@pytest.fixture
def model(fake_engine) -> str:
    return fake_engine.model_name


def conversation_of(response) -> Conversation:
    return Conversation.objects.get(pk=response.conversation.id.removeprefix("conv_"))


def test_a_response_is_answered_and_stored(client, model, user):
    response = client.responses.create(model=model, input="Hello there", instructions="Be kind.")

    assert response.status == "completed" and response.output_text == "Echo: Hello there"
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.usage.output_tokens == 3 and response.usage.total_tokens == (
        response.usage.input_tokens + 3
    )
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    conversation = conversation_of(response)
    assert conversation.owner == user and conversation.system_prompt == "Be kind."
    assert stored(conversation.pk) == [("user", "Hello there"), ("assistant", "Echo: Hello there")]
    reply = conversation.messages.get(role="assistant")
    assert response.id == f"resp_{reply.pk.hex}"
    page = Client()
    assert page.login(username=user.username, password=PASSWORD)
    html = page.get(f"/c/{conversation.pk}/").content.decode()
    assert "Hello there" in html and "Echo: Hello there" in html


def test_previous_response_id_goes_on_in_the_same_conversation(client, model, fake_engine):
    first = client.responses.create(model=model, input="one")
    second = client.responses.create(model=model, input="two", previous_response_id=first.id)
    third = client.responses.create(model=model, input="three", previous_response_id=second.id)

    assert conversation_of(first) == conversation_of(second) == conversation_of(third)
    assert third.previous_response_id == second.id
    # The model read the earlier turns, rebuilt from the database.
    assert [m["content"] for m in fake_engine.calls[-1]] == [
        "one",
        "Echo: one",
        "two",
        "Echo: two",
        "three",
    ]
    assert len(stored(conversation_of(first).pk)) == 6


def test_an_earlier_previous_response_id_starts_a_new_conversation_from_it(client, model):
    first = client.responses.create(model=model, input="one", instructions="S")
    client.responses.create(model=model, input="two", previous_response_id=first.id)

    branch = client.responses.create(model=model, input="other", previous_response_id=first.id)

    original, copy = conversation_of(first), conversation_of(branch)
    assert copy != original and copy.system_prompt == "S"
    assert stored(copy.pk) == [
        ("user", "one"),
        ("assistant", "Echo: one"),
        ("user", "other"),
        ("assistant", "Echo: other"),
    ]
    assert len(stored(original.pk)) == 4, "the original is left as it was"


def test_a_response_set_aside_in_the_web_ui_is_gone_on_from_as_it_was(client, model, fake_engine):
    first = client.responses.create(model=model, input="one")
    conversation = conversation_of(first)
    fake_engine.replies = ["a newer version"]
    services.regenerate(conversation=conversation).run()

    branch = client.responses.create(model=model, input="two", previous_response_id=first.id)

    assert conversation_of(branch) != conversation
    assert stored(conversation_of(branch).pk)[:2] == [("user", "one"), ("assistant", "Echo: one")]
    assert stored(conversation.pk) == [("user", "one"), ("assistant", "a newer version")]


def test_instructions_given_later_become_the_system_prompt(client, model, fake_engine):
    first = client.responses.create(model=model, input="one", instructions="Old.")
    client.responses.create(
        model=model, input="two", previous_response_id=first.id, instructions="New."
    )
    assert conversation_of(first).system_prompt == "New."
    assert fake_engine.calls[-1][0] == {"role": "system", "content": "New."}


def test_items_given_whole_are_stored_before_the_answer(client, model):
    response = client.responses.create(
        model=model,
        input=[
            {"role": "developer", "content": "Terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello"}],
            },
            {"role": "user", "content": "And now?"},
        ],
    )
    conversation = conversation_of(response)
    assert conversation.system_prompt == "Terse."
    assert stored(conversation.pk)[:3] == [
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "And now?"),
    ]
    inputs = client.responses.input_items.list(response.id, order="asc")
    assert [(i.role, i.content[0].text) for i in inputs.data] == [
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "And now?"),
    ]


def test_the_sdks_stream_helper_accepts_the_events(client, model):
    first = client.responses.create(model=model, input="one")
    with client.responses.stream(
        model=model, input="a b c", previous_response_id=first.id
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()

    kinds = [event.type for event in events]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == EVENT_ORDER
    assert kinds.count("response.output_text.delta") == 4
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "Echo: a b c"
    assert final.status == "completed" and final.usage.output_tokens == 4
    assert conversation_of(final) == conversation_of(first)
    assert Message.objects.get(pk=final.id.removeprefix("resp_")).content == text


def test_each_event_is_an_event_line_and_a_data_line(live_server, key, model):
    response = httpx.post(
        f"{live_server.url}/v1/responses",
        json={"model": model, "input": "x y", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == event_line[7:]
    assert "[DONE]" not in response.text
    assert blocks[-1].startswith("event: response.completed")


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(live_server, key, model):
    response = httpx.post(
        f"{live_server.url}/v1/responses",
        json={"model": model, "input": "a b c d", "stream": True, "max_output_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    events = [
        json.loads(block.split("\n")[1].removeprefix("data: "))
        for block in response.text.split("\n\n")
        if block
    ]
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["content"][0]["text"] == "Echo: a"
    assert last["response"]["usage"]["output_tokens"] == 2


def test_a_failure_while_streaming_is_an_error_then_response_failed(
    live_server, key, model, fake_engine
):
    fake_engine.fail_with, fake_engine.fail_after = RuntimeError("broke mid-way"), 2
    response = httpx.post(
        f"{live_server.url}/v1/responses",
        json={"model": model, "input": "a b c", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    events = [
        json.loads(block.split("\n")[1].removeprefix("data: "))
        for block in response.text.split("\n\n")
        if block
    ]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert "broke mid-way" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "broke mid-way" in failed["error"]["message"]
    reply = Message.objects.get(role="assistant")
    assert reply.status == "error" and reply.content == "Echo: a"


def test_a_failed_response_is_the_clients_server_error(client, model, fake_engine):
    fake_engine.fail_with = RuntimeError("the model broke")
    with pytest.raises(openai.InternalServerError) as raised:
        client.responses.create(model=model, input="x")
    assert raised.value.status_code == 503
    assert Message.objects.get(role="user").content == "x", "the input is kept"


def test_a_response_is_retrieved_and_deleted(client, model):
    first = client.responses.create(model=model, input="one")
    second = client.responses.create(model=model, input="two", previous_response_id=first.id)

    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == "Echo: two"
    assert got.status == "completed" and got.previous_response_id == first.id

    client.responses.delete(second.id)

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    assert stored(conversation_of(first).pk) == [("user", "one"), ("assistant", "Echo: one")]


@pytest.mark.parametrize(
    ("options", "status", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0].type",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "1", "output": "x"}]},
            400,
            "input[0].type",
        ),
        ({"input": [{"role": "assistant", "content": "last"}]}, 400, "input"),
        ({"previous_response_id": "resp_00000000000000000000000000000000"}, 404, None),
        ({"previous_response_id": "nonsense"}, 404, "previous_response_id"),
        ({"conversation": "conv_00000000000000000000000000000000"}, 404, None),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"store": False}, 400, "store"),
        ({"max_output_tokens": 100000}, 400, "max_output_tokens"),
        ({"model": "gpt-9"}, 404, "model"),
    ],
)
def test_what_cannot_be_done_is_a_clear_error(client, model, options, status, param):
    request = {"model": model, "input": "x", **options}
    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(**request)
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["message"] and (param is None or error["param"] == param), error
    assert not Message.objects.exists()


def test_both_previous_response_id_and_conversation_is_a_400(client, model):
    first = client.responses.create(model=model, input="one")
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(
            model=model,
            input="x",
            previous_response_id=first.id,
            conversation=first.conversation.id,
        )
    assert raised.value.body["param"] == "conversation"


def test_another_users_response_and_conversation_are_not_found(client, model, live_server):
    other = make_user("other")
    theirs = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=issue_key(user=other, name="k")[1], max_retries=0
    )
    response = client.responses.create(model=model, input="mine")
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.create(model=model, input="x", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        theirs.conversations.items.list(response.conversation.id)
    with pytest.raises(openai.NotFoundError):
        theirs.conversations.delete(response.conversation.id)
    assert len(stored(conversation_of(response).pk)) == 2


# Conversations


def test_a_conversation_made_with_items_is_answered_in_it(client, model, fake_engine):
    conversation = client.conversations.create(
        items=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Remember 42."},
            {"role": "assistant", "content": "Noted."},
        ],
        metadata={"topic": "numbers"},
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "numbers"}

    response = client.responses.create(
        model=model, input="Which number?", conversation=conversation.id
    )

    assert response.conversation.id == conversation.id
    row = Conversation.objects.get(pk=conversation.id.removeprefix("conv_"))
    assert row.system_prompt == "Be brief." and row.title == "Remember 42."
    assert fake_engine.calls[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Remember 42."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Which number?"},
    ]
    items = client.conversations.items.list(conversation.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == stored(row.pk)
    assert items.data[-1].id == f"msg_{response.id.removeprefix('resp_')}"


def test_conversation_items_are_listed_added_and_deleted(client, model):
    conversation = client.conversations.create()
    added = client.conversations.items.create(
        conversation.id,
        items=[{"role": "user", "content": f"m{i}"} for i in range(5)],
    )
    assert [item.content[0].text for item in added.data] == [f"m{i}" for i in range(5)]

    newest = client.conversations.items.list(conversation.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["m4", "m3"] and newest.has_more
    after = client.conversations.items.list(conversation.id, limit=2, after=newest.last_id)
    assert [i.content[0].text for i in after.data] == ["m2", "m1"]
    every = [i.content[0].text for i in client.conversations.items.list(conversation.id)]
    assert every == ["m4", "m3", "m2", "m1", "m0"], "the SDK pages through them all"

    one = client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id)
    assert one.content[0].text == "m1"
    client.conversations.items.delete(added.data[1].id, conversation_id=conversation.id)
    row = Conversation.objects.get(pk=conversation.id.removeprefix("conv_"))
    assert [text for _, text in stored(row.pk)] == ["m0", "m2", "m3", "m4"]


def test_a_conversations_metadata_is_updated_and_it_is_deleted(client):
    conversation = client.conversations.create(metadata={"a": "1"})
    updated = client.conversations.update(conversation.id, metadata={"b": "2"})
    assert updated.metadata == {"b": "2"}
    assert client.conversations.retrieve(conversation.id).metadata == {"b": "2"}

    deleted = client.conversations.delete(conversation.id)

    assert deleted.deleted and deleted.id == conversation.id
    assert not Conversation.objects.exists()
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_a_conversation_made_in_the_web_ui_is_one_here(client, model, user):
    conversation = services.create_conversation(owner=user, title="From the page")
    services.post_message(conversation=conversation, content="typed")
    conv_id = f"conv_{conversation.pk.hex}"

    items = client.conversations.items.list(conv_id, order="asc")

    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", "typed"),
        ("assistant", "Echo: typed"),
    ]
    client.responses.create(model=model, input="and from the SDK", conversation=conv_id)
    assert len(stored(conversation.pk)) == 4


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        (
            {"items": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "items[0].content[0].type",
        ),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_conversation_requests_are_a_400_naming_the_parameter(client, request_body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/conversations", body=request_body, cast_to=object)
    assert raised.value.body["param"] == param
    assert not Conversation.objects.exists()


# With the real model


def test_the_bundled_model_streams_a_response(live_server, key):
    client = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=120
    )
    model = services.served_models()[0]
    with client.responses.stream(
        model=model, input="What is the capital of France? Answer in one word.", temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert "paris" in final.output_text.lower()

    cut = client.responses.create(
        model=model,
        input="Write a long story about a lighthouse keeper.",
        previous_response_id=final.id,
        max_output_tokens=5,
        temperature=0,  # (a counting prompt's greedy reply here was "One Hundred.")
    )
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5 and cut.max_output_tokens == 5
    assert len(stored(conversation_of(final).pk)) == 4
