"""The prefix cache: a follow-up turn recomputes only its new tokens, and answers exactly as it
would without the cache."""

import pytest
import torch

from conversations.llm.engine import Engine, GenerationParams
from conversations.llm.prefix_cache import PrefixCache, common_prefix_length
from tests.tiny_models import build_tiny_causal


def kv(length):
    """Stands in for an exported slot row: 20 bytes per token."""
    return torch.zeros(length, 5, dtype=torch.float32)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_take_reuses_the_shared_prefix_and_leaves_the_last_prompt_token():
    cache = PrefixCache(max_bytes=10_000)
    stored = kv(5)
    cache.put("a", [1, 2, 3, 4, 5], stored)
    taken, reused = cache.take("a", [1, 2, 3, 9, 9])
    assert reused == 3 and taken is stored
    assert len(cache) == 0, "an entry in use is out of the cache"

    cache.put("a", [1, 2, 3], kv(3))
    _, reused = cache.take("a", [1, 2, 3])  # the same prompt again (regenerate)
    assert reused == 2, "the last token is always computed"


def test_nothing_shared_or_unknown_key_is_a_miss():
    cache = PrefixCache(max_bytes=10_000)
    cache.put("a", [1, 2, 3], kv(3))
    assert cache.take("a", [7, 8, 9]) == (None, 0)
    assert cache.take("b", [1, 2, 3]) == (None, 0)
    assert (cache.hits, cache.misses) == (0, 2)


def test_least_recently_used_entries_leave_first_within_the_byte_budget():
    cache = PrefixCache(max_bytes=250)  # 20 bytes a token
    cache.put("a", list(range(5)), kv(5))  # 100 bytes
    cache.put("b", list(range(5)), kv(5))
    cache.put("c", list(range(5)), kv(5))  # 300 > 250: "a" goes
    assert cache.take("a", list(range(6))) == (None, 0)
    assert cache.nbytes == 200
    cache.put("huge", list(range(50)), kv(50))  # larger than the budget: not kept
    assert cache.take("huge", list(range(51))) == (None, 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-prefix"), context_window=256)


def turn(engine, messages, key=None):
    stream = engine.stream(messages, GenerationParams(max_new_tokens=6), cache_key=key)
    for _ in stream:
        pass
    return stream


def test_follow_up_reuses_the_previous_turn_and_answers_the_same(tiny_dir, tmp_path):
    cached = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    plain = Engine(model=str(tiny_dir), cache_dir=tmp_path, prefix_cache_bytes=0)
    history = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello"}]
    for question in ["how are you", "what is the capital of france", "tell me about paris"]:
        with_cache = turn(cached, history, key="chat")
        without = turn(plain, history)
        assert with_cache.result.text == without.result.text
        assert with_cache.result.completion_tokens == without.result.completion_tokens
        history = [
            *history,
            {"role": "assistant", "content": with_cache.result.text},
            {"role": "user", "content": question},
        ]
    assert with_cache.reused_tokens > 10, "the third turn reused the earlier ones"
    assert without.reused_tokens == 0
    assert cached._prefix_cache.hits >= 2


def test_an_edited_history_reuses_only_what_is_unchanged(tiny_dir, tmp_path):
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    first = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello"}]
    reply = turn(engine, first, key="chat").result.text
    follow_up = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "hi"}]
    full = turn(engine, follow_up, key="chat").reused_tokens
    edited = [first[0], {"role": "user", "content": "good bye"}]
    stream = turn(engine, edited, key="chat")
    assert 0 < stream.reused_tokens < full
    plain = Engine(model=str(tiny_dir), cache_dir=tmp_path, prefix_cache_bytes=0)
    assert stream.result.text == turn(plain, edited).result.text
