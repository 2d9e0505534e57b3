"""The product answering through RemoteEngine, against real OpenAI-compatible servers of the
bundled model (`transformers serve`, llama.cpp's server) on a loopback port: replies posted and
streamed through the API, their statistics from the server's usage, stopping, regenerating,
titles, a server killed in the middle of a reply and a server that is not there. The generated
text is checked for its properties only (the "Paris" smoke answer aside). Against a stand-in
server (httpx's MockTransport), what the engine keeps so as not to ask twice: a failed look-up
of the served model, and prompt counts."""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from conversations import runtime, services
from conversations.llm import remote
from conversations.llm.interface import ChatMessage, Generation, GenerationParams
from conversations.llm.loading import bundled_gguf_path, prepare_bundled_model
from conversations.llm.remote import RemoteEngine, RemoteReply
from conversations.models import Message
from tests.factories import (
    REPLY_STATS,
    EventReader,
    assert_detail,
    detail_url,
    kinds,
    make_conversation,
    parse_events,
    post,
    stream_post,
    url,
)
from tests.inference_servers import (
    LLAMA_CPP_LEFT,
    InferenceServer,
    llama_cpp_server,
    running_server,
    transformers_serve,
)
from tests.live_server import free_port
from tests.processes import run_python

# Committed, as a server's writes are: the lease keeper renews a reply's lease through its own
# connection (another thread) while the reply is written, and a long reply outlives a renewal.
# In a test's open transaction its rows are not there for the keeper (on PostgreSQL), which
# would take them for replies stopped elsewhere and stop them.
pytestmark = pytest.mark.django_db(transaction=True)

REPLY_TOKENS = 48  # the replies' budget, but for the long ones below: short replies, quick tests
LONG_STORY = "Write a very long story about a lighthouse keeper, in many chapters."


class CountingEngine(RemoteEngine):
    """RemoteEngine as it is, remembering what it was asked: the messages of every reply it
    streamed, and each whole generation (generate(): the model-written titles)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.streamed: list[list[ChatMessage]] = []
        self.generated: list[tuple[list[ChatMessage], GenerationParams]] = []

    def stream(self, messages, params, **options) -> RemoteReply:
        self.streamed.append(messages)
        return super().stream(messages, params, **options)

    def generate(self, messages, params, **options) -> Generation:
        self.generated.append((messages, params))
        return super().generate(messages, params, **options)


@pytest.fixture(scope="session")
def model_folder() -> Path:
    """The bundled model as a folder of safetensors and tokenizer files, what the server loads
    and where the product reads the tokenizer."""
    return prepare_bundled_model(settings.CHATBOT_MODEL_CACHE)


SERVERS = ("transformers-serve", "llama-cpp")


@contextmanager
def started(kind: str, model_folder: Path) -> Iterator[InferenceServer]:
    if kind == "llama-cpp":
        with running_server(
            llama_cpp_server(bundled_gguf_path()), says_when_left=LLAMA_CPP_LEFT
        ) as server:
            yield server
    else:
        with running_server(transformers_serve(model_folder)) as server:
            yield server


@pytest.fixture(scope="session", params=SERVERS)
def inference_server(request, model_folder) -> Iterator[InferenceServer]:
    """Each server in turn: `transformers serve` on the safetensors folder, llama.cpp's server
    on the bundled GGUF."""
    with started(request.param, model_folder) as server:
        yield server


@pytest.fixture(params=SERVERS)
def own_inference_server(request, model_folder) -> Iterator[InferenceServer]:
    """A server of the test's own, for a test that kills it."""
    with started(request.param, model_folder) as server:
        yield server


@contextmanager
def engine_on(base_url: str, model_folder: Path, **options) -> Iterator[CountingEngine]:
    """The process's engine asks the server at `base_url` for the test's duration."""
    options = {"tokenizer": str(model_folder), "read_timeout": 120, **options}
    engine = CountingEngine(base_url=base_url, **options)
    previous = runtime.set_engine(engine)
    try:
        yield engine
    finally:
        runtime.set_engine(previous)
        engine.client.close()


@contextmanager
def served_by(server: InferenceServer, model_folder: Path) -> Iterator[CountingEngine]:
    """engine_on the server; what the server logged meanwhile is printed at the end, and so
    shown with a failing test's output."""
    start = server.log_size()
    try:
        with engine_on(server.url, model_folder) as engine:
            yield engine
    finally:
        print(f"--- the inference server's log ({server.log}) ---")
        print(server.log_text(start))


@pytest.fixture
def quick_settings(settings):
    settings.CHATBOT_AUTO_TITLE = False  # (the titles' test turns them back on)
    settings.CHATBOT_MAX_NEW_TOKENS = REPLY_TOKENS
    return settings


@pytest.fixture
def remote_engine(inference_server, model_folder, quick_settings) -> Iterator[CountingEngine]:
    with served_by(inference_server, model_folder) as engine:
        yield engine


def served_models(server: InferenceServer) -> list[str]:
    listing = httpx.get(f"{server.url}/models", timeout=10).json()["data"]
    return [item["id"] for item in listing]


def server_usage(server: InferenceServer, model: str, messages: list[ChatMessage]) -> dict:
    """The usage the server reports for a reply to `messages`, asked without the product (not
    streamed: llama.cpp's server reports usage only then)."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
    answer = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]


def wait_for_log(server: InferenceServer, start: int, text: str, seconds: float = 30) -> bool:
    """Whether the server's log, from byte `start` on, comes to hold `text` within `seconds`."""
    deadline = time.monotonic() + seconds
    while text not in server.log_text(start):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def deltas(events) -> str:
    return "".join(data["text"] for kind, data in events if kind == "delta")


# --- replies -------------------------------------------------------------------------------------


@pytest.mark.inference_server
def test_first_answer_comes_from_the_server_with_its_usage(
    api, owner, remote_engine, inference_server
):
    conversation = make_conversation(owner, "Chat")

    reply = post(api, conversation, "What is the capital of France?")["reply"]

    assert reply["status"] == "ok"
    assert set(reply) >= REPLY_STATS
    assert reply["content"].strip()
    assert "Paris" in reply["content"]
    assert reply["model"] in served_models(inference_server)
    assert reply["model"] == remote_engine.load().name
    (sent,) = remote_engine.streamed
    # The server's count of the prompt, the reply's, and the product's own with the local
    # tokenizer (what it trims long histories by) are one number.
    usage = server_usage(inference_server, reply["model"], sent)
    assert reply["prompt_tokens"] == usage["prompt_tokens"] == remote_engine.count_tokens(sent)
    assert 0 < reply["completion_tokens"] <= REPLY_TOKENS
    assert 0 <= reply["ttft_ms"] <= reply["total_ms"]
    assert reply["context_turns"] == 0
    saved = Message.objects.get(pk=reply["id"])
    assert (saved.status, saved.content) == (Message.Status.OK, reply["content"])
    assert saved.generation_params["finish_reason"] in ("stop", "length")


@pytest.mark.inference_server
def test_a_follow_up_sends_the_history_from_the_database(api, owner, remote_engine):
    conversation = make_conversation(owner, "Chat")
    first = post(api, conversation, "What is the capital of France?")["reply"]

    second = post(api, conversation, "And what is the capital of Germany?")["reply"]

    assert second["status"] == "ok"
    assert second["context_turns"] == 2
    # The second prompt holds the first question and its reply, and a question more.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]
    history = [m["content"] for m in remote_engine.streamed[1]]
    assert history[-3:] == [
        "What is the capital of France?",
        first["content"],
        "And what is the capital of Germany?",
    ]


@pytest.mark.inference_server
def test_a_streamed_reply_is_saved_as_its_deltas(api, owner, remote_engine):
    conversation = make_conversation(owner, "Chat")

    response = stream_post(api, url(conversation), {"content": "Name three colours."})
    events = parse_events(b"".join(response.streaming_content))

    names = kinds(events)
    assert names[0] == "user_message"
    assert names[-1] == "done"
    assert set(names[1:-1]) == {"delta"}
    done = events[-1][1]
    assert done["status"] == "ok"
    assert deltas(events) == done["content"] == Message.objects.get(pk=done["id"]).content
    assert done["content"].strip()
    assert done["completion_tokens"] > 0


@pytest.mark.inference_server
def test_stop_after_the_first_delta_keeps_the_partial_reply(
    api, owner, remote_engine, inference_server
):
    conversation = make_conversation(owner, "Chat", max_new_tokens=1000)
    log_start = inference_server.log_size()
    reader = EventReader(stream_post(api, url(conversation), {"content": LONG_STORY}))
    first = reader.until("delta")

    stop = api.post(url(conversation, "stop"), format="json")

    assert stop.status_code == 200
    assert stop.json()["stopped"] is True
    rest = reader.rest()
    assert kinds(rest)[-1] == "done"
    done = rest[-1][1]
    assert done["status"] == "cancelled"
    reply = Message.objects.get(pk=done["id"])
    assert reply.status == Message.Status.CANCELLED
    assert reply.content == done["content"] == deltas([first, *rest])
    assert reply.content.strip()
    assert reply.generation_params["finish_reason"] == "cancelled"
    assert reply.completion_tokens < 1000

    # Stopping closed the stream to the server, and the server stopped writing the reply: the
    # server that says so in its log (llama.cpp's) said it.
    if inference_server.says_when_left:
        assert wait_for_log(inference_server, log_start, inference_server.says_when_left)
    # The server let the reply go: the next message is answered (a short one, to be quick).
    shorter = api.patch(detail_url(conversation), {"max_new_tokens": REPLY_TOKENS}, format="json")
    assert shorter.status_code == 200, shorter.content
    assert post(api, conversation, "Thank you.")["reply"]["status"] == "ok"


@pytest.mark.inference_server
def test_regenerate_writes_a_second_version(api, owner, remote_engine):
    conversation = make_conversation(owner, "Chat")
    first = post(api, conversation, "Name a fruit.")["reply"]

    response = api.post(url(conversation, "regenerate"), format="json")

    assert response.status_code == 201, response.content
    second = response.json()["reply"]
    assert second["status"] == "ok"
    assert second["content"].strip()
    assert second["id"] != first["id"]
    assert (second["version"], second["versions"]) == (2, 2)
    question = Message.objects.get(pk=first["reply_to"])
    assert question.replies.count() == 2
    assert question.replies.get(is_active=True).pk == Message.objects.get(pk=second["id"]).pk
    assert len(remote_engine.streamed) == 2


@pytest.mark.inference_server
def test_the_model_is_asked_for_a_title_after_the_first_exchange(
    api, owner, remote_engine, quick_settings
):
    quick_settings.CHATBOT_AUTO_TITLE = True
    conversation = make_conversation(owner)
    question = "What is the capital of France?"
    fallback = services.fallback_title(question)

    response = stream_post(api, url(conversation), {"content": question})
    events = parse_events(b"".join(response.streaming_content))

    assert kinds(events)[-1] in ("done", "title")
    assert events[kinds(events).index("done")][1]["status"] == "ok"
    # One whole generation was asked of the server, the title's, about the first message.
    ((messages, params),) = remote_engine.generated
    assert messages == [{"role": "user", "content": services.TITLE_PROMPT.format(message=question)}]
    assert (params.max_new_tokens, params.temperature) == (16, 0)
    conversation.refresh_from_db()
    titles = [data["title"] for kind, data in events if kind == "title"]
    if titles:  # the model's answer was a clean, short title
        assert titles == [conversation.title]
        assert conversation.title != fallback
        assert len(conversation.title.split()) <= services.TITLE_MAX_WORDS
    else:  # it was not: the first message's line stays
        assert conversation.title == fallback

    # A conversation is named once.
    post(api, conversation, "Thanks.")
    assert len(remote_engine.generated) == 1


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.inference_server
def test_a_server_killed_mid_reply_leaves_an_error_and_a_free_conversation(
    api, owner, own_inference_server, model_folder, quick_settings
):
    with served_by(own_inference_server, model_folder):
        conversation = make_conversation(owner, "Chat", max_new_tokens=1000)
        reader = EventReader(stream_post(api, url(conversation), {"content": LONG_STORY}))
        first = reader.until("delta")

        own_inference_server.kill()
        rest = reader.rest()

        assert kinds(rest)[-1] == "error"
        failed = rest[-1][1]
        assert "inference server" in failed["detail"]
        reply = Message.objects.get(pk=failed["reply"]["id"])
        assert reply.status == Message.Status.ERROR
        assert reply.content == deltas([first, *rest])
        assert reply.content.strip()
        assert "inference server" in reply.error
        assert reply.reply_to.content == LONG_STORY

        # Free: the next message is taken (not 409), and fails for want of the server.
        response = api.post(url(conversation), {"content": "Are you there?"}, format="json")

        detail = assert_detail(response, 503)
        assert "inference server" in detail and "could not be reached" in detail
        questions = conversation.messages.filter(role=Message.Role.USER)
        assert list(questions.order_by("created_at").values_list("content", flat=True)) == [
            LONG_STORY,
            "Are you there?",
        ]
        assert response.json()["reply"]["status"] == "error"
        assert not conversation.messages.filter(status=Message.Status.STREAMING).exists()


def test_a_server_that_is_not_there_gives_503_and_keeps_the_message(
    api, owner, model_folder, quick_settings
):
    with engine_on(f"http://127.0.0.1:{free_port()}/v1", model_folder):
        conversation = make_conversation(owner, "Chat")

        response = api.post(url(conversation), {"content": "Hello?"}, format="json")

    detail = assert_detail(response, 503)
    assert "inference server" in detail and "could not be reached" in detail
    assert response.json()["user_message"]["content"] == "Hello?"
    question = conversation.messages.get(role=Message.Role.USER)
    assert question.content == "Hello?"
    reply = conversation.messages.get(role=Message.Role.ASSISTANT)
    assert reply.status == Message.Status.ERROR
    assert "could not be reached" in reply.error
    assert response.json()["reply"]["id"] == str(reply.pk)


@pytest.mark.inference_server
def test_a_model_the_server_does_not_list_gives_503_naming_those_it_does(
    api, owner, inference_server, model_folder, quick_settings
):
    # (llama.cpp's server would answer any name with its one model: the reply would be labelled
    # with a model that did not write it.)
    with engine_on(inference_server.url, model_folder, model="no-such-model"):
        conversation = make_conversation(owner, "Chat")

        response = api.post(url(conversation), {"content": "Hello?"}, format="json")

    detail = assert_detail(response, 503)
    assert f"The inference server at {inference_server.url} serves " in detail
    assert "no-such-model" in detail
    for name in served_models(inference_server):
        assert name in detail
    assert response.json()["reply"]["status"] == "error"
    assert conversation.messages.get(role=Message.Role.USER).content == "Hello?"


def test_a_server_that_is_down_is_tried_once_per_message(api, owner, quick_settings):
    tried: list[str] = []

    def down(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.path)
        raise httpx.ConnectError("Connection refused", request=request)

    engine = stand_in_engine(down)
    previous = runtime.set_engine(engine)
    try:
        conversation = make_conversation(owner, "Chat")
        response = api.post(url(conversation), {"content": "Hello?"}, format="json")
        assert "could not be reached" in assert_detail(response, 503)
        assert tried == ["/v1/models"], "the model's name and its reply share one attempt"

        engine._unavailable_until = 0.0  # the failure is stale: the next message asks again
        response = api.post(url(conversation), {"content": "Now?"}, format="json")
        assert "could not be reached" in assert_detail(response, 503)
        assert tried == ["/v1/models", "/v1/models"]
    finally:
        runtime.set_engine(previous)
        engine.client.close()


def test_a_prompt_counted_for_its_context_is_not_counted_again_for_its_reply():
    counted: list[list[ChatMessage]] = []
    # A stream with no usage, as llama.cpp's server sends: the reply needs its prompt's count.
    stream = (
        'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
        'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'
        "data: [DONE]\n\n"
    )

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        if request.url.path == "/tokenize":  # (vLLM's)
            messages = json.loads(request.content)["messages"]
            counted.append(messages)
            return httpx.Response(200, json={"count": 10 * len(messages)})
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, text=stream, headers={"Content-Type": "text/event-stream"})
        return httpx.Response(404, json={"detail": "Not Found"})

    engine = stand_in_engine(server)
    engine.load()
    counted.clear()  # (the probe that picked /tokenize)
    messages: list[ChatMessage] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]

    assert engine.count_tokens(messages) == 20
    reply = engine.stream([dict(m) for m in messages], GenerationParams())  # an equal copy
    assert list(reply) == ["Hi"]

    assert reply.result is not None and reply.result.prompt_tokens == 20
    assert counted == [messages], "the reply reused the count its context was built with"
    others = [[{"role": "user", "content": f"Question {n}"}] for n in range(remote.COUNTS_KEPT)]
    for other in others:
        engine.count_tokens(other)
    engine.count_tokens(others[-1])
    assert len(counted) == 1 + remote.COUNTS_KEPT, "a count kept is not asked for again"
    engine.count_tokens(messages)
    assert counted[-1] == messages, "the oldest count made way for newer ones"
    engine.client.close()


def stand_in_engine(server) -> RemoteEngine:
    """A RemoteEngine whose requests `server` answers (an httpx.MockTransport handler)."""
    engine = RemoteEngine(base_url="http://inference.test/v1")
    engine.client.close()
    engine.client = httpx.Client(transport=httpx.MockTransport(server))
    return engine


@pytest.mark.parametrize(
    "answer, detail",
    [
        (
            httpx.Response(404, json={"error": {"message": "No such model", "code": 404}}),
            "No such model",
        ),
        (httpx.Response(400, json={"error": "Bad request body"}), "Bad request body"),
        (
            httpx.Response(422, json={"detail": "Field required: messages"}),
            "Field required: messages",
        ),
        (
            httpx.Response(422, json={"detail": [{"loc": ["body", "model"], "msg": "Missing"}]}),
            "Missing",
        ),
        (httpx.Response(502, text="  upstream went away\n"), "upstream went away"),
        (httpx.Response(503, text=""), "Service Unavailable"),
        (httpx.Response(500, json=["odd", "body"]), '["odd", "body"]'),
    ],
    ids=["openai", "openai-string", "fastapi", "fastapi-list", "text", "empty", "other-json"],
)
def test_error_detail_reads_each_servers_error_body(answer, detail):
    assert detail in remote.error_detail(answer)
    assert remote.refused("http://server/v1", answer).startswith(
        f"The inference server at http://server/v1 answered {answer.status_code}: "
    )


# --- no torch in the web process -----------------------------------------------------------------

NO_TORCH = """
import dataclasses, json, sys
import django
django.setup()
from conversations import runtime
from conversations.llm.remote import RemoteEngine
engine = runtime.get_engine()
assert isinstance(engine, RemoteEngine), engine
params = dataclasses.replace(runtime.default_generation_params(), max_new_tokens=4)
reply = engine.generate([{"role": "user", "content": "Hello"}], params)
print(json.dumps({"completion_tokens": reply.completion_tokens, "torch": "torch" in sys.modules}))
"""


@pytest.mark.inference_server
def test_replies_from_a_server_import_no_torch(inference_server, model_folder):
    result = run_python(
        "-c",
        NO_TORCH,
        env={
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "CHATBOT_ENGINE_URL": inference_server.url,
            "CHATBOT_TOKENIZER": str(model_folder),
        },
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["completion_tokens"] > 0
    assert outcome["torch"] is False
