"""The real engine and context builder on tiny models the tests build: fast, no network."""

import pytest

from conversations import runtime, services
from conversations.context import build_context
from conversations.errors import ContextOverflow
from conversations.llm.engine import Engine, GenerationParams
from conversations.models import Message
from tests.tiny_models import build_tiny_blenderbot, build_tiny_causal

PARAMS = GenerationParams(max_new_tokens=16)  # with a 64-token window: 48 tokens of prompt


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory):
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-causal"), context_window=64)


@pytest.fixture(scope="session")
def tiny_blenderbot_dir(tmp_path_factory):
    return build_tiny_blenderbot(tmp_path_factory.mktemp("tiny-blenderbot"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_causal_dir, tmp_path_factory):
    return Engine(model=str(tiny_causal_dir), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def conversation(owner):
    return services.create_conversation(owner=owner, system_prompt="be good")


def add(conversation, role, content, status=Message.Status.OK):
    return Message.objects.create(
        conversation=conversation, role=role, content=content, status=status
    )


def add_turns(conversation, count):
    for i in range(count):
        add(conversation, "user", f"hello {i}")
        add(conversation, "assistant", f"hi {i}")


def turn_messages(indices):
    """The turns `add_turns` stores with these indices, as the model is given them."""
    return [
        message
        for i in indices
        for message in (
            {"role": "user", "content": f"hello {i}"},
            {"role": "assistant", "content": f"hi {i}"},
        )
    ]


def test_local_directory_model_loads_as_causal(tiny_engine, tiny_causal_dir):
    loaded = tiny_engine.load()
    assert not loaded.is_seq2seq
    assert loaded.source_dir == str(tiny_causal_dir)
    assert tiny_engine.model_name == tiny_causal_dir.name
    assert tiny_engine.prompt_budget(PARAMS) == 64 - 16


def test_context_setting_lowers_the_window(tiny_causal_dir, tmp_path):
    engine = Engine(model=str(tiny_causal_dir), cache_dir=tmp_path, context_tokens=40)
    assert engine.context_window() == 40
    assert engine.prompt_budget(PARAMS) == 24


def test_context_keeps_every_turn_in_order_when_it_fits(db, conversation, tiny_engine):
    add_turns(conversation, 2)
    new = add(conversation, "user", "what is my name")
    context = build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)
    assert context.messages == [
        {"role": "system", "content": "be good"},
        *turn_messages([0, 1]),
        {"role": "user", "content": "what is my name"},
    ]
    assert context.context_turns == 4
    assert context.dropped_turns == 0
    assert context.prompt_tokens == tiny_engine.count_tokens(context.messages)


def test_context_drops_whole_turns_oldest_first(db, conversation, tiny_engine):
    add_turns(conversation, 10)  # far more than 48 tokens
    new = add(conversation, "user", "what is my name")
    context = build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)
    budget = tiny_engine.prompt_budget(PARAMS)

    assert context.messages[0] == {"role": "system", "content": "be good"}
    assert context.messages[-1] == {"role": "user", "content": "what is my name"}
    kept = context.messages[1:-1]
    assert kept, "some history fits in 48 tokens"
    assert kept[0]["role"] == "user", "turns are dropped whole"
    assert kept[-1] == {"role": "assistant", "content": "hi 9"}, "the newest turns stay"
    assert context.prompt_tokens <= budget
    # One more (older) turn would not have fitted.
    first_index = int(kept[0]["content"].split()[1])
    older = turn_messages([first_index - 1])
    wider = context.messages[:1] + older + context.messages[1:]
    assert tiny_engine.count_tokens(wider) > budget
    assert context.context_turns == len(kept)
    assert context.dropped_turns == 20 - len(kept)


def test_context_leaves_out_failed_replies_and_other_conversations(
    db, owner, conversation, tiny_engine
):
    add(conversation, "user", "hello")
    add(conversation, "assistant", "", status=Message.Status.ERROR)
    other = services.create_conversation(owner=owner)
    add(other, "user", "paris")
    new = add(conversation, "user", "hi")
    context = build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)
    assert [m["content"] for m in context.messages] == ["be good", "hello", "hi"]


def test_context_loads_history_in_one_query(
    db, conversation, tiny_engine, django_assert_num_queries
):
    add_turns(conversation, 10)
    new = add(conversation, "user", "what is my name")
    with django_assert_num_queries(1):
        build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)


def test_system_prompt_and_new_message_are_never_dropped(db, conversation, tiny_engine):
    add_turns(conversation, 3)
    long_but_fitting = " ".join(["hello"] * 30)
    new = add(conversation, "user", long_but_fitting)
    context = build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)
    assert context.messages == [
        {"role": "system", "content": "be good"},
        {"role": "user", "content": long_but_fitting},
    ]
    assert context.dropped_turns == 6


def test_reply_budget_never_takes_more_than_half_a_short_window(tiny_engine):
    params = GenerationParams(max_new_tokens=1000)
    assert tiny_engine.reply_budget(params) == 32
    assert tiny_engine.prompt_budget(params) == 32
    generation = tiny_engine.generate([{"role": "user", "content": "hello"}], params)
    assert generation.completion_tokens <= 32


def test_message_too_long_for_the_model_is_kept_and_reported(
    db, settings, conversation, tiny_engine
):
    settings.CHATBOT_MAX_NEW_TOKENS = 16
    previous = runtime.set_engine(tiny_engine)
    try:
        with pytest.raises(ContextOverflow) as caught:
            services.post_message(conversation=conversation, content=" ".join(["hi"] * 60))
    finally:
        runtime.set_engine(previous)
    assert caught.value.budget == 48
    user_message, reply = caught.value.exchange.user_message, caught.value.exchange.reply
    assert Message.objects.filter(pk=user_message.pk, role="user").exists()
    reply.refresh_from_db()
    assert reply.status == Message.Status.ERROR
    assert "48 tokens" in reply.error


def test_post_message_with_the_real_engine_stores_reply_stats(
    db, settings, conversation, tiny_engine
):
    settings.CHATBOT_MAX_NEW_TOKENS = 8
    previous = runtime.set_engine(tiny_engine)
    try:
        first = services.post_message(conversation=conversation, content="hello")
        second = services.post_message(conversation=conversation, content="how are you")
    finally:
        runtime.set_engine(previous)
    reply = second.reply
    reply.refresh_from_db()
    assert reply.status == Message.Status.OK
    assert reply.model == tiny_engine.model_name
    assert reply.prompt_tokens > first.reply.prompt_tokens
    assert 0 < reply.completion_tokens <= 8
    assert reply.ttft_ms is not None and reply.total_ms >= reply.ttft_ms
    assert reply.context_turns == 2
    assert reply.generation_params["max_new_tokens"] == 8
    assert reply.generation_params["finish_reason"] in {"stop", "length"}


def test_sampling_parameters_are_accepted(tiny_engine):
    messages = [{"role": "user", "content": "hello"}]
    params = GenerationParams(max_new_tokens=5, temperature=0.8, top_p=0.9)
    generation = tiny_engine.generate(messages, params)
    assert 1 <= generation.completion_tokens <= 5


def test_greedy_generation_is_deterministic(tiny_engine):
    messages = [{"role": "user", "content": "what is the capital of france"}]
    params = GenerationParams(max_new_tokens=6)
    first = tiny_engine.generate(messages, params)
    second = tiny_engine.generate(messages, params)
    assert (second.text, second.completion_tokens) == (first.text, first.completion_tokens)


def test_seq2seq_blenderbot_path(transactional_db, owner, tiny_blenderbot_dir, tmp_path):
    engine = Engine(model=str(tiny_blenderbot_dir), cache_dir=tmp_path)
    loaded = engine.load()
    assert loaded.is_seq2seq
    # The encoder reads the whole prompt; the reply has the decoder's own positions.
    assert engine.prompt_budget(PARAMS) == engine.context_window() == 32
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello how are you"},
    ]
    # Turns are joined into one text, the way Blenderbot was trained.
    assert engine.count_tokens(messages) == len(
        loaded.tokenizer("be nice  hello how are you")["input_ids"]
    )
    generation = engine.generate(messages, GenerationParams(max_new_tokens=6))
    assert isinstance(generation.text, str)
    assert 1 <= generation.completion_tokens <= 6

    previous = runtime.set_engine(engine)
    try:
        conversation = services.create_conversation(owner=owner, system_prompt="")
        services.post_message(conversation=conversation, content="hello")
        exchange = services.post_message(conversation=conversation, content="how are you")
    finally:
        runtime.set_engine(previous)
    assert exchange.reply.status == Message.Status.OK
    assert exchange.reply.model == tiny_blenderbot_dir.name
    assert exchange.reply.context_turns == 2


def test_a_history_that_fits_is_counted_once(db, conversation, tiny_engine, monkeypatch):
    add_turns(conversation, 2)
    new = add(conversation, "user", "what is my name")
    counted = []
    original = tiny_engine.count_tokens
    monkeypatch.setattr(tiny_engine, "count_tokens", lambda m: counted.append(m) or original(m))
    build_context(conversation, new_message=new, engine=tiny_engine, params=PARAMS)
    assert len(counted) == 1


def test_a_counted_prompt_is_not_tokenized_again_to_generate(tiny_engine, monkeypatch):
    messages = [{"role": "user", "content": "hello how are you"}]
    tiny_engine.encodings.clear()  # the engine is shared by this module's tests
    calls = []
    prompts = tiny_engine.backend.prompts
    render = prompts.render
    monkeypatch.setattr(prompts, "render", lambda m: calls.append(m) or render(m))
    counted = tiny_engine.count_tokens(messages)
    result = tiny_engine.generate(messages, GenerationParams(max_new_tokens=3))
    assert result.prompt_tokens == counted
    assert len(calls) == 1
    other = [{"role": "user", "content": "hello"}]
    assert tiny_engine.count_tokens(other) < counted and len(calls) == 2


@pytest.mark.parametrize("model", ["causal", "seq2seq"])
def test_a_reply_cancelled_before_it_begins_ends_at_once(
    tiny_causal_dir, tiny_blenderbot_dir, tmp_path, model
):
    """Both paths, the decoder's and generate's: the reader hears the end, nothing hangs."""
    import threading

    directory = tiny_causal_dir if model == "causal" else tiny_blenderbot_dir
    engine = Engine(model=str(directory), cache_dir=tmp_path)
    engine.load()
    stream = engine.stream([{"role": "user", "content": "hello"}], GenerationParams())
    stream.cancel()
    reader = threading.Thread(target=lambda: list(stream), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream never ended"
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens == 0


def test_remembered_encodings_stay_within_their_bytes(tiny_causal_dir, tmp_path):
    from conversations.llm import engine as engine_module

    engine = Engine(model=str(tiny_causal_dir), cache_dir=tmp_path, token_cache_bytes=8_000)
    chats = [[{"role": "user", "content": "hello " * (i + 5)}] for i in range(12)]
    for chat in chats:
        engine.count_tokens(chat)
        held = sum(
            engine_module.encoding_bytes(key, prompt) for key, prompt in engine.encodings.items()
        )
        assert engine.encodings.nbytes == held <= 4_000  # half of them (the other: the prompts')
        assert engine.prompt_tokenizer.nbytes <= 4_000
    assert 1 < len(engine.encodings) < len(chats)
    assert list(engine.encodings)[-1] == (("user", chats[-1][0]["content"]),)
