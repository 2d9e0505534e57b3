"""Prompts tokenized turn by turn give the ids of prompts tokenized whole, with the bundled
model's tokenizer; a tokenizer that encodes pieces differently is tokenized whole. A reply's text
decoded piece by piece is its text decoded whole."""

import pytest
from django.conf import settings
from transformers import AutoTokenizer

from conversations.llm.loading import prepare_bundled_model
from conversations.llm.tokens import SAMPLE_CONVERSATION, PromptTokenizer, ReplyText

TURNS = [
    ("Hello!", "Hi there! How can I help you today?"),
    ("  What is the capital of France?\n", "The capital of France is **Paris**.\n\n- Eiffel Tower"),
    ("Café, naïve, 東京 and 🙂: spell them.", " C-a-f-é.  N-a-ï-v-e.\n東京 🙂"),
    ("Say <|im_end|> literally, then a newline.\n", "<|im_end|>\n"),
    ("", "   "),
    ("Thanks", "You're welcome!"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(prepare_bundled_model(settings.CHATBOT_MODEL_CACHE))


def render(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_a_growing_conversation_gets_the_ids_of_whole_tokenization(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    assert prompts.check(render(tokenizer, SAMPLE_CONVERSATION))
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for question, answer in TURNS:
        messages.append({"role": "user", "content": question})
        whole = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        before = prompts.tokenized_chars
        assert prompts.encode(render(tokenizer, messages)) == list(whole["input_ids"])
        tokenized = prompts.tokenized_chars - before
        messages.append({"role": "assistant", "content": answer})
    assert tokenized < len(render(tokenizer, messages)) / 4, "only the new turn was tokenized"


def test_an_edited_earlier_message_reuses_only_what_comes_before_it(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    prompts.check(render(tokenizer, SAMPLE_CONVERSATION))
    first = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
    ]
    edited = [*first[:1], {"role": "user", "content": "Name a fruit."}, *first[2:]]
    prompts.encode(render(tokenizer, first))
    ids = prompts.encode(render(tokenizer, edited))
    expected = tokenizer.apply_chat_template(edited, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"])


class PrefixingTokenizer:
    """Stands in for a tokenizer that marks the start of every text it encodes (as those that
    add a prefix space do): pieces encoded alone differ from the whole."""

    all_special_ids = [0]

    def __call__(self, text, **kwargs):
        ids, offsets = [9], [(0, 0)]
        for i, char in enumerate(text):
            ids.append(0 if char == "|" else ord(char))
            offsets.append((i, i + 1))
        return {"input_ids": ids, "offset_mapping": offsets}


def test_a_tokenizer_that_encodes_pieces_differently_is_used_whole():
    prompts = PromptTokenizer(PrefixingTokenizer())
    assert not prompts.check("ab|cd|ef")
    prompts.encode("ab|cd|")
    assert prompts.encode("ab|cd|ef") == [
        9,
        *map(ord, "ab"),
        0,
        *map(ord, "cd"),
        0,
        *map(ord, "ef"),
    ]


@pytest.mark.parametrize("step", [1, 3])
def test_a_reply_decoded_piece_by_piece_is_the_reply_decoded_whole(tokenizer, step):
    """Tokens come one or a few at a time; characters of several bytes span tokens, special
    tokens decode to nothing, and leading whitespace is dropped."""
    replies = [answer for _, answer in TURNS] + ["\n\n  Café 東京 🙂🙂 naïve.\t done <|im_end|>"]
    for reply in replies:
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        text = ReplyText(tokenizer)
        pieces = [text.add(ids[i : i + step]) for i in range(0, len(ids), step)]
        whole = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        assert "".join(pieces) == whole, (reply, pieces)
        assert not any("\ufffd" in piece for piece in pieces)
    # A character of several bytes whose tokens come one at a time is held back until it is
    # whole: some token then adds nothing.
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    text = ReplyText(tokenizer)
    assert [text.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_a_long_reply_is_decoded_a_few_tokens_at_a_time(tokenizer):
    """Each hand-over decodes the new tokens and the few before them, not the whole reply."""
    lengths = []

    class Counting:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer(" and so on" * 200 + " 東京 🙂", add_special_tokens=False)["input_ids"]
    text = ReplyText(Counting())
    assert "".join(text.add([i]) for i in ids) == tokenizer.decode(ids).lstrip()
    # (The new token, the one before it, and the tokens of a character still incomplete.)
    assert len(ids) > 600 and max(lengths) <= 8, max(lengths)


QUESTION = [{"role": "user", "content": "Name three fish."}]


@pytest.fixture
def prompts(tokenizer):
    """A PromptTokenizer checked on the sample conversation, QUESTION's prompt encoded."""
    prompts = PromptTokenizer(tokenizer)
    assert prompts.check(render(tokenizer, SAMPLE_CONVERSATION), SAMPLE_CONVERSATION[2]["content"])
    prompts.encode(render(tokenizer, QUESTION))
    return prompts


def list_reply(tokenizer, fish="Tuna"):
    """A numbered list as the model writes it: "\\n\\n" as one token before "1", where the
    tokenizer makes two "\\n" tokens of that text."""
    text = f"Three:\n\n1. {fish}"
    written = [
        *tokenizer("Three:", add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids("ĊĊ"),
        *tokenizer(f"1. {fish}", add_special_tokens=False)["input_ids"],
    ]
    assert tokenizer.decode(written) == text
    assert written != tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, written


def answered(reply):
    """QUESTION answered with `reply`, and a follow-up."""
    return [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]


def tokenized_whole(tokenizer, messages):
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )


def test_the_next_prompt_holds_the_ids_the_model_wrote_its_reply_in(tokenizer, prompts):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompts.turn_end == ("<|im_end|>", end)
    prompt = render(tokenizer, QUESTION)
    prompt_ids = prompts.encode(prompt)
    text, written = list_reply(tokenizer)
    prompts.remember(prompt, prompt_ids, written, text)

    ids = prompts.encode(render(tokenizer, answered(text)))
    assert ids[: len(prompt_ids) + len(written) + 1] == [*prompt_ids, *written, end]
    assert tokenizer.decode(ids) == render(tokenizer, answered(text)), "the same text"
    # The rest is tokenized as the tokenizer does it.
    rest = render(tokenizer, answered(text))[len(prompt + text + "<|im_end|>") :]
    assert rest.startswith("\n<|im_start|>user\nMore")
    assert ids[len(prompt_ids) + len(written) + 1 :] == tokenizer(rest)["input_ids"]
    # Regenerating the reply reuses the prompt's ids: the longer text holds them. And the
    # new reply is remembered too, though the prompt is no longer remembered on its own.
    assert prompts.encode(prompt) == prompt_ids
    text, again = list_reply(tokenizer, "Cod")
    prompts.remember(prompt, prompt_ids, again, text)
    ids = prompts.encode(render(tokenizer, answered(text)))
    assert ids[: len(prompt_ids) + len(again) + 1] == [*prompt_ids, *again, end]


def test_trailing_whitespace_the_kept_reply_lost_is_left_out_with_its_tokens(tokenizer, prompts):
    """A reply cut at its length limit may end in a line break, which the kept text drops: the
    tokens before it are remembered."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = render(tokenizer, QUESTION)
    prompt_ids = prompts.encode(prompt)
    text, written = list_reply(tokenizer)
    newline = tokenizer.convert_tokens_to_ids("ĊĊ")
    prompts.remember(prompt, prompt_ids, [*written, newline, newline], text)
    ids = prompts.encode(render(tokenizer, answered(text)))
    assert ids[: len(prompt_ids) + len(written) + 1] == [*prompt_ids, *written, end]
    assert tokenizer.decode(ids) == render(tokenizer, answered(text))


def test_a_reply_kept_other_than_the_model_wrote_it_is_tokenized_again(tokenizer, prompts):
    """Text the ids do not decode to exactly (whitespace stripped, the reply edited): the next
    prompt has the tokenizer's ids for it."""
    prompt = render(tokenizer, QUESTION)
    text, written = list_reply(tokenizer)
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    for kept in (text.replace("Tuna", "Cod"), text.strip("Th"), text + " "):
        prompt_ids = prompts.encode(prompt)
        prompts.remember(prompt, prompt_ids, [*space, *written], kept)
        prompts.remember(prompt, prompt_ids, written, kept)
        ids = prompts.encode(render(tokenizer, answered(kept)))
        assert ids == tokenized_whole(tokenizer, answered(kept)), kept


def test_a_reply_to_a_prompt_fed_other_ids_than_its_own_is_not_remembered(tokenizer, prompts):
    prompt = render(tokenizer, QUESTION)
    prompt_ids = prompts.encode(prompt)
    text, written = list_reply(tokenizer)
    prompts.remember(prompt, [*prompt_ids[:-1], 0], written, text)
    ids = prompts.encode(render(tokenizer, answered(text)))
    assert ids == tokenized_whole(tokenizer, answered(text))


def test_remembered_prompts_stay_within_their_bytes_and_keep_the_newest(tokenizer):
    from conversations.llm.tokens import prompt_bytes

    prompts = PromptTokenizer(tokenizer, max_bytes=40_000)
    prompts.check(render(tokenizer, SAMPLE_CONVERSATION))
    texts = [
        render(tokenizer, [{"role": "user", "content": f"Number {i}. " * 40}]) for i in range(20)
    ]
    for text in texts:
        prompts.encode(text)
        held = sum(prompt_bytes(t, ids) for t, (ids, _) in prompts._recent.items())
        assert prompts.nbytes == held <= 40_000
    assert list(prompts._recent)[-1] == texts[-1] and 1 < len(prompts._recent) < 20
    # A prompt larger than the bytes on its own is still kept (the newest always is) until the
    # next one comes.
    huge = render(tokenizer, [{"role": "user", "content": "word " * 20_000}])
    prompts.encode(huge)
    assert list(prompts._recent) == [huge] and prompts.nbytes > 40_000
    prompts.encode(texts[0])
    assert list(prompts._recent) == [texts[0]]
