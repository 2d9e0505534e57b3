"""The prefix cache: a follow-up turn recomputes only its new tokens, and answers exactly as it
would without the cache."""

import threading
import time

import pytest
import torch

from conversations.llm.engine import Engine, GenerationParams
from conversations.llm.prefix_cache import CacheKey, PrefixCache, common_prefix_length
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
    cache.put("a", [1] * 5, kv(5))  # 100 bytes
    cache.put("b", [2] * 5, kv(5))
    cache.put("c", [3] * 5, kv(5))  # 300 > 250: "a" goes
    assert cache.take("a", [1] * 6) == (None, 0)
    assert cache.nbytes == 200
    cache.put("huge", [4] * 50, kv(50))  # larger than the budget: not kept
    assert cache.take("huge", [4] * 51) == (None, 0)


def test_the_budget_counts_the_bytes_entries_keep_alive_not_their_views():
    cache = PrefixCache(max_bytes=1_000)
    base = torch.zeros(100, 5)  # 2,000 bytes
    cache.put("a", [1] * 5, base[:5])  # a view of 100 bytes into it
    taken, _ = cache.take("a", [1] * 6)
    assert taken.untyped_storage().nbytes() == taken.nbytes == 100, "its own copy, not the base"
    assert torch.equal(taken, base[:5])
    for key in "bcdefghijk":  # ten entries of 100 bytes: the last ten fit exactly
        cache.put(key, [2] * 5, base[5:10])
    cache.put("l", [3] * 5, kv(5))
    assert len(cache) == 10 and cache.nbytes == 1_000
    held = sum(e.cache.untyped_storage().nbytes() for _, e in cache.entries())
    assert held == cache.nbytes


def test_a_new_conversation_borrows_the_longest_shared_start_of_its_owners_others():
    cache = PrefixCache(max_bytes=10_000)
    system = [7, 7, 1, 2, 3]  # e.g. the template's header and a system prompt
    cache.put(CacheKey("ann", "short"), [*system[:3], 9, 9], kv(5))
    longest = kv(7)
    cache.put(CacheKey("ann", "long"), [*system, 5, 6], longest)
    taken, reused = cache.take(CacheKey("ann", "new"), [*system, 8, 8, 8])
    assert (taken, reused) == (longest, 5)
    assert len(cache) == 2, "a borrowed entry stays for its own conversation"
    # A conversation's own entry comes first, even when another shares more.
    cache.put(CacheKey("ann", "own"), [*system[:4], 0], kv(5))
    _, reused = cache.take(CacheKey("ann", "own"), [*system, 8])
    assert reused == 4 and len(cache) == 2
    assert cache.take(CacheKey("ann", "other"), [3, 3, 3]) == (None, 0)
    assert (cache.hits, cache.misses) == (2, 1)


def test_another_owners_entries_never_lend_only_what_every_user_shares_does():
    cache = PrefixCache(max_bytes=10_000)
    header, secret = [7, 7], [1, 2, 3, 4, 5, 6]
    cache.put(CacheKey("alice", "a"), [*header, *secret, 9], kv(9))
    for key in [CacheKey("bob", "copy"), "a key naming no owner"]:
        assert cache.take(key, [*header, *secret, 8]) == (None, 0), "a copy of Alice's text"
    shared = kv(3)
    cache.share([*header, 4], shared)  # the header and a default system prompt
    copy = cache.take(CacheKey("bob", "copy"), [*header, *secret, 8])
    guess = cache.take(CacheKey("bob", "guess"), [*header, 6, 5, 4, 3, 2, 1, 8])
    assert copy == guess == (shared, 2), "the copy and the wrong guess reuse the header alone"
    assert cache.take(CacheKey("bob", "default"), [*header, 4, 8]) == (shared, 3)
    assert cache.take(CacheKey("alice", "b"), [*header, *secret, 8])[1] == 8, "her own"
    # Deleting drops a conversation's entries; the shared one stays.
    cache.discard_where(lambda key: key.conversation == "a")
    assert len(cache) == 0
    assert cache.take(CacheKey("alice", "b"), [*header, *secret, 8]) == (shared, 2)


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
    assert cached.prefix_cache.hits >= 2


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


def follow_up(messages, reply, question):
    return [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": question},
    ]


def assert_same_row_0(engine, plain, length):
    """Both engines' slot row 0 holds the same keys and values for the first `length`
    positions."""
    for ours, theirs in zip(
        engine.decoder.cache.keys + engine.decoder.cache.values,
        plain.decoder.cache.keys + plain.decoder.cache.values,
        strict=True,
    ):
        torch.testing.assert_close(ours[0, :, :length], theirs[0, :, :length], rtol=1e-4, atol=1e-4)


def test_the_last_conversation_answered_stays_in_place_until_its_row_is_wanted(tiny_dir, tmp_path):
    # fp32, so that keys computed in pieces and at once compare closely (below).
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path, weights="fp32")
    plain = Engine(model=str(tiny_dir), cache_dir=tmp_path, prefix_cache_bytes=0, weights="fp32")
    a = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello"}]
    b = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"}]

    a_reply = turn(engine, a, key="a").result.text
    assert len(engine.prefix_cache) == 0, "the last conversation answered is parked, not copied"
    a = follow_up(a, a_reply, "what is the capital of france")
    a_second = turn(engine, a, key="a")
    assert a_second.reused_tokens > 10
    assert a_second.result.text == turn(plain, a).result.text

    # Another conversation takes the row: the parked one is copied to the prefix cache first.
    b_reply = turn(engine, b, key="b").result.text
    assert len(engine.prefix_cache) == 1
    a = follow_up(a, a_second.result.text, "tell me about paris")
    a_third = turn(engine, a, key="a")
    assert a_third.reused_tokens > a_second.reused_tokens
    assert a_third.result.text == turn(plain, a).result.text

    # Scoring uses a spare row, which is the parked one's: it is copied away first, too.
    engine.score_reply(b, b_reply)
    a = follow_up(a, a_third.result.text, "and germany")
    a_fourth = turn(engine, a, key="a")
    assert a_fourth.reused_tokens > a_third.reused_tokens
    assert a_fourth.result.text == turn(plain, a).result.text
    # (The tiny model's words hardly depend on the history; its keys and values do.) Both
    # engines' row 0 now holds this conversation, computed in pieces here, at once there.
    assert_same_row_0(engine, plain, a_fourth.result.prompt_tokens)


def test_a_new_conversation_starts_from_the_system_prompt_its_owner_computed(tiny_dir, tmp_path):
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path, weights="fp32")
    plain = Engine(model=str(tiny_dir), cache_dir=tmp_path, prefix_cache_bytes=0, weights="fp32")
    system = {"role": "system", "content": "be good and kind and brief in every answer"}
    turn(engine, [system, {"role": "user", "content": "hello"}], key=CacheKey("ann", "a"))
    b = [system, {"role": "user", "content": "what is the capital of france"}]
    b_turn = turn(engine, b, key=CacheKey("ann", "b"))
    system_tokens = engine.count_tokens([system])
    assert system_tokens - 3 <= b_turn.reused_tokens < b_turn.result.prompt_tokens
    assert b_turn.result.text == turn(plain, b).result.text
    # Row 0 of both engines holds conversation b: borrowed and continued here, at once there.
    assert_same_row_0(engine, plain, b_turn.result.prompt_tokens)
    assert len(engine.prefix_cache) == 1, "conversation a keeps its entry"


def test_another_users_copy_reuses_no_more_than_a_wrong_guess(tiny_dir, tmp_path):
    """The time to a reply's first token tells how much of its prompt was reused: a copy of
    another user's text reuses what a wrong guess of the same length does (what every user
    shares), however the owner's own conversations reuse it."""
    default = "you are a helpful assistant"
    engine = Engine(
        model=str(tiny_dir), cache_dir=tmp_path, weights="fp32", shared_system_prompt=default
    )
    plain = Engine(model=str(tiny_dir), cache_dir=tmp_path, prefix_cache_bytes=0, weights="fp32")
    secret = {"role": "system", "content": "the launch code is nine four two seven one"}
    wrong = {"role": "system", "content": "the launch code is five five one three six"}
    alice = [secret, {"role": "user", "content": "remember it"}]
    turn(engine, alice, key=CacheKey("alice", "a"))
    turn(engine, [{"role": "user", "content": "hello"}], key=CacheKey("carol", "c"))  # parks c
    question = {"role": "user", "content": "what is the code"}
    copy = turn(engine, [secret, question], key=CacheKey("bob", "copy"))
    guess = turn(engine, [wrong, question], key=CacheKey("eve", "guess"))  # (not Bob's copy's)
    assert engine.count_tokens([secret]) == engine.count_tokens([wrong])
    assert copy.reused_tokens == guess.reused_tokens < 5, "the template's header at most"
    assert copy.result.text == turn(plain, [secret, question]).result.text
    own = turn(engine, [secret, question], key=CacheKey("alice", "a2"))
    assert own.reused_tokens >= engine.count_tokens([secret]) - 3
    # What every user shares: the default system prompt, computed when the model loaded.
    chat = [{"role": "system", "content": default}, question]
    shared = turn(engine, chat, key=CacheKey("dave", "d"))
    assert shared.reused_tokens >= engine.count_tokens([chat[0]]) - 3
    assert shared.result.text == turn(plain, chat).result.text


def test_forgetting_a_conversation_drops_its_entry_its_parked_row_and_its_reply(tiny_dir, tmp_path):
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    system = {"role": "system", "content": "be good and kind and brief in every answer"}
    chats = {name: [system, {"role": "user", "content": f"hello {name}"}] for name in "abc"}
    turn(engine, chats["a"], key=CacheKey("ann", "a"))
    turn(engine, chats["b"], key=CacheKey("ann", "b"))  # a goes to the cache; b is parked
    assert len(engine.prefix_cache) == 1 and engine.scheduler.parked_key is not None
    engine.forget("a").result()
    engine.forget("b").result()
    assert len(engine.prefix_cache) == 0 and engine.scheduler.parked_key is None
    assert turn(engine, chats["c"], key=CacheKey("ann", "c")).reused_tokens == 0
    # A reply in flight when its conversation is deleted keeps nothing when it ends.
    engine.scheduler.forget(lambda key: key == CacheKey("ann", "c"))  # (parked c goes)
    busy = threading.Event()
    engine.scheduler.call(busy.wait)
    stream = engine.stream(
        chats["a"], GenerationParams(max_new_tokens=6), cache_key=CacheKey("ann", "a")
    )
    reader = threading.Thread(target=lambda: [*stream])
    reader.start()
    deadline = time.monotonic() + 30
    while not engine.scheduler.uncollected and time.monotonic() < deadline:
        time.sleep(0.01)
    forgotten = engine.forget("a")
    busy.set()
    reader.join(timeout=60)
    forgotten.result()
    engine.scheduler.call(lambda: None).result()
    assert stream.result.completion_tokens > 0
    assert len(engine.prefix_cache) == 0 and engine.scheduler.parked_key is None


def write_together(engine, chats, params, keys):
    """The replies to these chats, posted while the model thread is busy so that they start
    together (one step feeds them all), read to the end."""
    engine.load()
    busy = threading.Event()
    engine.scheduler.call(busy.wait)
    streams = [engine.stream(c, params, cache_key=k) for c, k in zip(chats, keys, strict=True)]
    readers = [threading.Thread(target=lambda s=stream: [*s]) for stream in streams]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while engine.scheduler.uncollected < len(chats) and time.monotonic() < deadline:
        time.sleep(0.01)
    busy.set()
    for reader in readers:
        reader.join(timeout=60)
    return streams


def test_a_burst_keeps_its_slot_rows_for_a_moment_then_gives_them_back(
    tiny_dir, tmp_path, monkeypatch
):
    """Replies ending together and follow-ups arriving a moment later find the slot tensors
    as they were; once nothing came for IDLE_SECONDS, they are freed and the conversations'
    keys and values wait in the prefix cache."""
    from conversations.llm import scheduler

    monkeypatch.setattr(scheduler, "IDLE_BYTES", 0)  # the tiny model's rows are small
    monkeypatch.setattr(scheduler, "IDLE_SECONDS", 1.0)
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    chats = [[{"role": "user", "content": f"hello number {i}"}] for i in range(3)]
    streams = write_together(engine, chats, GenerationParams(max_new_tokens=6), ["0", "1", "2"])
    cache = engine.decoder.cache
    assert engine.scheduler.widest == 3
    assert cache.rows == 3, "kept for the burst's next messages"

    deadline = time.monotonic() + 30
    while cache.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.rows == 0 and len(engine.prefix_cache) == 3
    again = turn(engine, follow_up(chats[1], streams[1].result.text, "and you"), key="1")
    assert again.reused_tokens > 0


def test_the_model_thread_ends_when_stopped_even_while_it_waits_to_free_memory(
    tiny_dir, tmp_path, monkeypatch
):
    """At exit the scheduler stops its thread (registered with atexit): a thread that woke up
    to free memory while the interpreter shuts down would abort the process."""
    from conversations.llm import scheduler

    monkeypatch.setattr(scheduler, "IDLE_BYTES", 0)
    monkeypatch.setattr(scheduler, "IDLE_SECONDS", 60.0)
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    chats = [[{"role": "user", "content": f"hi {i}"}] for i in range(2)]
    write_together(engine, chats, GenerationParams(max_new_tokens=4), [None, None])
    assert engine.decoder.cache.rows == 2  # the thread now waits up to 60 s to free them
    started = time.monotonic()
    engine.scheduler.stop()
    assert not engine.scheduler.is_alive() and time.monotonic() - started < 5


def test_a_reply_whose_ids_cannot_be_remembered_still_ends_whole(tiny_dir, tmp_path, caplog):
    engine = Engine(model=str(tiny_dir), cache_dir=tmp_path)
    engine.load()

    def fail(*args):
        raise RuntimeError("no")

    engine.prompt_tokenizer.remember = fail
    history = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello"}]
    stream = turn(engine, history, key="chat")
    assert stream.result.finish_reason in ("stop", "length") and stream.result.completion_tokens
    assert "Could not remember the ids of a reply" in caplog.text
    # The next turn is tokenized as usual and reuses what the prefix cache holds.
    follow = turn(engine, follow_up(history, stream.result.text, "again"), key="chat")
    assert follow.reused_tokens > 0 and follow.result.completion_tokens


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A tiny model with room for long prompts: the slot tensors grow in steps of 256."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-wide"), context_window=1024)


def long_chat(words=600):
    from tests.tiny_models import WORDS

    return [{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(words))}]


def test_slot_rows_widened_by_a_long_conversation_are_cut_back_once_it_has_left(
    wide_dir, tmp_path, monkeypatch
):
    """Every row has as many positions as the longest in flight needs; under steady load no
    idle moment comes to free them, so they are cut back when the replies end."""
    from conversations.llm import slot_rows

    monkeypatch.setattr(slot_rows, "TRIM_BYTES", 0)  # the tiny model's rows are small
    engine = Engine(model=str(wide_dir), cache_dir=tmp_path)
    plain = Engine(model=str(wide_dir), cache_dir=tmp_path, prefix_cache_bytes=0)
    params = GenerationParams(max_new_tokens=6)
    turn(engine, long_chat())
    cache = engine.decoder.cache
    assert cache.positions >= 768
    chats = [[{"role": "user", "content": f"hello number {i}"}] for i in range(3)]
    streams = write_together(engine, chats, params, ["0", "1", "2"])
    engine.scheduler.call(lambda: None).result()  # the model thread has let go of the rows
    assert engine.scheduler.widest == 3
    assert (cache.rows, cache.positions) == (3, 256), "cut back to what the short ones need"
    # What the rows held is intact: the conversation parked in row 0 (or cached) goes on.
    for i in range(3):
        chat = follow_up(chats[i], streams[i].result.text, "and you")
        again = turn(engine, chat, key=str(i))
        assert again.reused_tokens > 0
        assert again.result.text == turn(plain, chat).result.text


def test_replies_wait_rather_than_take_the_slot_rows_past_their_bytes(wide_dir, tmp_path):
    engine = Engine(model=str(wide_dir), cache_dir=tmp_path)
    engine.load()
    cache = engine.decoder.cache
    cache.max_bytes = cache.bytes_for(2, 256)  # two short replies' rows
    engine.batch_bytes = cache.max_bytes
    sizes = []
    real_resize = cache.resize

    def resize(rows, positions):
        real_resize(rows, positions)
        sizes.append((cache.rows, cache.nbytes))

    cache.resize = resize
    params = GenerationParams(max_new_tokens=6)
    chats = [[{"role": "user", "content": f"hello number {i}"}] for i in range(4)]
    streams = write_together(engine, chats, params, ["0", "1", "2", "3"])
    assert engine.scheduler.widest == 2, "two rows at a time: the others waited"
    assert all(s.result.completion_tokens > 0 for s in streams)
    # A long conversation with short ones: it runs, alone, though its one row passes the bytes.
    streams = write_together(engine, [long_chat(), *chats[:2]], params, ["long", "0", "1"])
    assert all(s.result.completion_tokens > 0 for s in streams)
    assert sizes and all(nbytes <= cache.max_bytes for rows, nbytes in sizes if rows > 1)
    assert max(nbytes for _, nbytes in sizes) > cache.max_bytes, "the long one ran"
