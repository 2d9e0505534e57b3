"""OpenAI's chat completions (/v1/chat/completions) driven by OpenAI's own Python client and by
LangChain's ChatOpenAI against a live server: answers and streams in OpenAI's shape, every
exchange stored, a resent history appended to the conversation it continues, and errors the
clients raise as their own exceptions. The stored rows are then read through the product's API
and pages."""

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from accounts.keys import issue_key
from conversations import leases, services
from conversations.models import Conversation, Message
from tests.conftest import PASSWORD, make_user


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
def model() -> str:
    return services.served_models()[0]


def stored(conversation_id) -> list[tuple[str, str]]:
    """The conversation's thread as the product's API shows it to its owner."""
    conversation = Conversation.objects.get(pk=conversation_id)
    api = APIClient()
    api.force_authenticate(conversation.owner)
    response = api.get(f"/api/conversations/{conversation_id}/messages/")
    assert response.status_code == 200
    return [(m["role"], m["content"]) for m in response.json()["results"]]


# With the fake engine (tests/fakes.py): an echo, word by word, deterministic.


def test_a_completion_is_answered_and_stored(client, fake_engine, user):
    fake_engine.model_name = services.served_models()[0]
    completion = client.chat.completions.create(
        model=fake_engine.model_name,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        user="end-user-7",
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Echo: Hello there"
    assert choice.finish_reason == "stop" and completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    conversation_id = completion.model_extra["conversation"]
    assert stored(conversation_id) == [("user", "Hello there"), ("assistant", "Echo: Hello there")]
    conversation = Conversation.objects.get(pk=conversation_id)
    assert conversation.owner == user and conversation.system_prompt == "Be brief."
    assert conversation.api_key.name == "sdk"
    reply = conversation.messages.get(role="assistant")
    assert reply.generation_params["user"] == "end-user-7"
    assert completion.id == f"chatcmpl-{reply.pk.hex}"
    # The model read what the client sent, the system prompt first.
    assert fake_engine.calls[-1][0] == {"role": "system", "content": "Be brief."}


def chat(client, model, messages, **options):
    return client.chat.completions.create(model=model, messages=messages, **options)


def test_a_resent_history_is_appended_to_the_conversation_it_continues(client, fake_engine):
    model = fake_engine.model_name
    history = [{"role": "user", "content": "one"}]
    first = chat(client, model, history)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "two"},
    ]
    second = chat(client, model, history)
    history += [
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "three"},
    ]
    third = chat(client, model, history)

    conversation = first.model_extra["conversation"]
    assert second.model_extra["conversation"] == third.model_extra["conversation"] == conversation
    assert Conversation.objects.count() == 1
    assert stored(conversation) == [
        ("user", "one"),
        ("assistant", "Echo: one"),
        ("user", "two"),
        ("assistant", "Echo: two"),
        ("user", "three"),
        ("assistant", "Echo: three"),
    ]
    # The model's context was rebuilt from the database: the earlier turns, as stored.
    assert [m["content"] for m in fake_engine.calls[-1]] == [
        "one",
        "Echo: one",
        "two",
        "Echo: two",
        "three",
    ]


def test_an_edited_earlier_message_forks_a_new_conversation(client, fake_engine):
    model = fake_engine.model_name
    first = chat(client, model, [{"role": "user", "content": "one"}])
    continued = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]
    chat(client, model, continued)
    edited = [
        {"role": "user", "content": "one, edited"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]
    fork = chat(client, model, edited)

    original = first.model_extra["conversation"]
    assert fork.model_extra["conversation"] != original
    assert len(stored(original)) == 4, "the original is left as it was"
    assert stored(fork.model_extra["conversation"]) == [
        ("user", "one, edited"),
        ("assistant", "Echo: one"),
        ("user", "two"),
        ("assistant", "Echo: two"),
    ]


@pytest.mark.parametrize(
    "change",
    ["reply edited", "turn left out", "system prompt changed", "other key", "older state"],
)
def test_what_does_not_continue_a_conversation_starts_another(
    client, fake_engine, live_server, user, change
):
    model = fake_engine.model_name
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]
    first = chat(client, model, turns[:2])
    chat(client, model, turns)  # the stored conversation now holds two exchanges
    resent = [dict(m) for m in turns]
    if change == "reply edited":
        resent[2]["content"] = "Something else"
    elif change == "turn left out":
        resent = [resent[0], resent[3]]
    elif change == "system prompt changed":
        resent[0]["content"] = "T"
    elif change == "other key":
        other = issue_key(user=user, name="other")[1]
        client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=other, max_retries=0)
    elif change == "older state":  # the first exchange again: the conversation went on since
        pass
    if change != "older state":
        resent[-1]["content"] = "three"

    again = chat(client, model, resent)

    assert again.model_extra["conversation"] != first.model_extra["conversation"]
    assert Conversation.objects.count() == 2
    assert len(stored(first.model_extra["conversation"])) == 4


def test_whitespace_around_a_resent_reply_still_continues(client, fake_engine):
    model = fake_engine.model_name
    first = chat(client, model, [{"role": "user", "content": "one"}])
    resent = [
        {"role": "user", "content": "one\n"},
        {"role": "assistant", "content": "  Echo: one\n"},
        {"role": "user", "content": "two"},
    ]
    assert (
        chat(client, model, resent).model_extra["conversation"]
        == (first.model_extra["conversation"])
    )


def test_a_conversation_continued_in_the_web_ui_is_not_appended_to(client, fake_engine):
    model = fake_engine.model_name
    first = chat(client, model, [{"role": "user", "content": "one"}])
    conversation = Conversation.objects.get(pk=first.model_extra["conversation"])
    services.post_message(conversation=conversation, content="from the page")

    resent = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]
    again = chat(client, model, resent)

    assert again.model_extra["conversation"] != str(conversation.pk)
    assert len(stored(conversation.pk)) == 4


def test_a_history_sent_whole_is_stored_as_given(client, fake_engine):
    """A front end that began elsewhere: its earlier turns are stored before the new one."""
    model = fake_engine.model_name
    completion = chat(
        client,
        model,
        [
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "you"}],
            },
            {"role": "assistant", "content": "Salut"},
            {"role": "assistant", "content": "Ça va ?"},
            {"role": "user", "content": "Yes"},
        ],
    )
    conversation = Conversation.objects.get(pk=completion.model_extra["conversation"])
    assert conversation.system_prompt == "Answer in French."
    assert conversation.title == "Hi, you"
    assert stored(conversation.pk) == [
        ("user", "Hi, you"),
        ("assistant", "Salut"),
        ("assistant", "Ça va ?"),
        ("user", "Yes"),
        ("assistant", "Echo: Yes"),
    ]
    salut = conversation.messages.get(content="Salut")
    assert salut.reply_to.content == "Hi, you" and salut.status == Message.Status.OK


def test_the_stream_is_openais_chunks_then_done(client, fake_engine):
    stream = chat(
        client,
        fake_engine.model_name,
        [{"role": "user", "content": "a b c"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: a b c"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    (conversation,) = Conversation.objects.all()
    assert stored(conversation.pk)[-1] == ("assistant", "Echo: a b c")


def test_the_raw_stream_ends_with_done(live_server, key, fake_engine):
    body = {
        "model": fake_engine.model_name,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
    }
    response = httpx.post(
        f"{live_server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and '"usage"' not in response.text
    assert response.headers["X-Conversation-Id"] == str(Conversation.objects.get().pk)


def test_stop_sequences_end_the_reply_without_them(client, fake_engine):
    fake_engine.replies = ["alpha beta gamma delta"]
    completion = chat(
        client, fake_engine.model_name, [{"role": "user", "content": "go"}], stop=["gam", "zz"]
    )
    assert completion.choices[0].message.content == "alpha beta "
    assert completion.choices[0].finish_reason == "stop"
    reply = Message.objects.get(role="assistant")
    assert reply.content == "alpha beta " and reply.generation_params["stop"] == ["gam", "zz"]

    fake_engine.replies = ["alpha beta gamma delta"]
    stream = chat(
        client,
        fake_engine.model_name,
        [{"role": "user", "content": "go again"}],
        stop="a d",
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "alpha beta gamm"


def test_the_requests_parameters_are_used_for_its_reply_only(client, fake_engine):
    completion = chat(
        client,
        fake_engine.model_name,
        [{"role": "user", "content": "a b c d e f"}],
        temperature=1.5,
        top_p=0.5,
        max_completion_tokens=3,
    )
    reply = Message.objects.get(role="assistant")
    params = reply.generation_params
    assert (params["temperature"], params["top_p"], params["max_new_tokens"]) == (1.5, 0.5, 3)
    assert completion.choices[0].finish_reason == "length"
    assert reply.content == "Echo: a b"
    conversation = reply.conversation
    assert conversation.temperature is None and conversation.max_new_tokens is None


# Errors, as the clients raise them


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_unsupported_or_invalid_parameters_are_a_400_naming_them(
    client, fake_engine, options, param
):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, fake_engine.model_name, [{"role": "user", "content": "x"}], **options)
    error = raised.value.body
    assert raised.value.status_code == 400
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]
    assert not Message.objects.exists(), "nothing is stored"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "late"},
                {"role": "user", "content": "y"},
            ],
            "messages[1].role",
        ),
        ([{"role": "user", "content": " "}], "messages[0].content"),
        ([], "messages"),
    ],
)
def test_unsupported_messages_are_a_400_naming_them(client, fake_engine, messages, param):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, fake_engine.model_name, messages)
    assert raised.value.body["param"] == param, raised.value.body
    assert not Message.objects.exists()


def test_an_unknown_model_is_the_clients_not_found_error(client, fake_engine):
    with pytest.raises(openai.NotFoundError) as raised:
        chat(client, "gpt-9", [{"role": "user", "content": "x"}])
    assert raised.value.body["code"] == "model_not_found"


def test_the_message_rate_limit_is_the_clients_rate_limit_error(client, fake_engine, settings):
    settings.CHATBOT_MESSAGES_PER_MINUTE = 1
    chat(client, fake_engine.model_name, [{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client, fake_engine.model_name, [{"role": "user", "content": "y"}])
    assert raised.value.body["code"] == "rate_limit_exceeded"
    assert int(raised.value.response.headers["Retry-After"]) > 0


def test_a_failed_reply_is_an_error_and_the_message_is_kept(client, fake_engine):
    fake_engine.fail_with = RuntimeError("the model broke")
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as raised:
            chat(client, fake_engine.model_name, [{"role": "user", "content": "x"}], stream=stream)
        assert raised.value.status_code == 503 and "the model broke" in raised.value.message
    assert Message.objects.filter(role="user").count() == 2
    replies = Message.objects.filter(role="assistant")
    assert {reply.status for reply in replies} == {"error"}
    assert not any(leases.keeper.holds(reply.pk) for reply in replies), "every writer ended"


def test_a_failure_while_streaming_is_an_error_the_client_raises(client, fake_engine):
    fake_engine.fail_with, fake_engine.fail_after = RuntimeError("broke mid-way"), 2
    stream = chat(
        client, fake_engine.model_name, [{"role": "user", "content": "a b c"}], stream=True
    )
    with pytest.raises(openai.APIError, match="broke mid-way"):
        for _ in stream:
            pass
    reply = Message.objects.get(role="assistant")
    assert reply.status == "error" and reply.content == "Echo: a"


def test_the_pages_show_the_stored_conversation(client, fake_engine, user):
    completion = chat(client, fake_engine.model_name, [{"role": "user", "content": "Shown?"}])
    page = Client()
    assert page.login(username=user.username, password=PASSWORD)
    html = page.get(f"/c/{completion.model_extra['conversation']}/").content.decode()
    assert "Shown?" in html and "Echo: Shown?" in html
    assert "Shown?" in page.get("/").content.decode()


# With the real model


def test_the_bundled_model_answers_through_the_sdk(client, model):
    completion = chat(
        client,
        model,
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        temperature=0,
    )
    assert "paris" in completion.choices[0].message.content.lower()
    assert completion.model == model and completion.usage.prompt_tokens > 10

    stream = chat(
        client,
        model,
        [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=5,
        temperature=0,  # (sampled, a reply could end on its own within the budget)
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == "length" and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = Message.objects.get(pk=chunks[0].id.removeprefix("chatcmpl-"))
    assert reply.content == text and reply.completion_tokens == 5


def test_langchains_chat_openai_streams_a_round_trip(live_server, key, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=model,
        base_url=f"{live_server.url}/v1",
        api_key=key,
        max_retries=0,
        temperature=0,
        max_tokens=16,
        stream_usage=True,
    )
    pieces = list(llm.stream("What is the capital of France? Answer in one word."))
    text = "".join(piece.content for piece in pieces)
    assert text.strip()
    usage = [p.usage_metadata for p in pieces if p.usage_metadata]
    assert usage and usage[-1]["output_tokens"] > 0
    reply = Message.objects.get(role="assistant")
    assert reply.content == text and reply.conversation.api_key is not None
    again = llm.invoke(
        [
            ("human", "What is the capital of France? Answer in one word."),
            ("ai", text),
            ("human", "And of Italy?"),
        ]
    )
    assert again.content.strip()
    assert Conversation.objects.count() == 1 and Message.objects.count() == 4


def test_admin_shows_which_conversations_a_program_sent(client, fake_engine, user):
    completion = chat(client, fake_engine.model_name, [{"role": "user", "content": "From SDK"}])
    services.create_conversation(owner=user, title="Typed on the page")
    get_user_model().objects.create_superuser("root", password=PASSWORD)
    admin = Client()
    assert admin.login(username="root", password=PASSWORD)

    sent = admin.get("/admin/conversations/conversation/?api_key__isempty=0").content.decode()
    typed = admin.get("/admin/conversations/conversation/?api_key__isempty=1").content.decode()

    assert "From SDK" in sent and "Typed on the page" not in sent
    assert "Typed on the page" in typed and "From SDK" not in typed
    page = admin.get(
        f"/admin/conversations/conversation/{completion.model_extra['conversation']}/change/"
    )
    assert "sdk (" in page.content.decode(), "the key, by its name"


def test_no_model_written_title_delays_the_answer(client, fake_engine, settings):
    """The model names chats made in the web UI after their first exchange; a conversation sent
    through /v1 keeps its first message's title, and the model writes nothing more."""
    settings.CHATBOT_AUTO_TITLE = True
    fake_engine.replies = ["Hello back", "A Title"]
    completion = chat(client, fake_engine.model_name, [{"role": "user", "content": "Hi there"}])
    conversation = Conversation.objects.get(pk=completion.model_extra["conversation"])
    assert conversation.title == "Hi there"
    assert len(fake_engine.calls) == 1, "only the reply was written"
