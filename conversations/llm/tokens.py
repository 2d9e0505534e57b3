"""Token ids of prompts that grow turn by turn, without tokenizing the whole history again; and
the text of a reply as its tokens come, without decoding the whole reply again.

A conversation's next prompt is its last prompt with the reply and a new message added. Special
tokens (ChatML's <|im_start|> and <|im_end|>, for one) cut a text into pieces that a tokenizer
encodes one by one, so the ids up to the last special token two prompts share can be reused as
they are, and only the rest is tokenized. Whether this tokenizer really encodes the pieces
independently is checked once, on a sample conversation (a special token that swallows the
spaces next to it, or a prefix space added to the start of every text, would break it); if it
does not, every prompt is tokenized whole.

A reply the model wrote is remembered with the model's own ids (remember()): a model does not
always write the ids the tokenizer would give its text (SmolLM2 writes "\n\n" as one token
before "1." where its tokenizer makes two "\n": 7 of 41 replies to the benchmarks'
questions, all numbered lists), and the next prompt then holds the ids the model computed keys
and values for, so a prefix cache reuses the whole reply instead of stopping where the ids first
differ. (Once a conversation's last turn is no longer among the remembered prompts, after a
restart say, its history is tokenized as the tokenizer does it: the same text in other ids.)
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from .prefix_cache import common_prefix_length

# Rendered with the model's chat template to check the tokenizer: spaces, line breaks and
# characters of several bytes on both sides of the special tokens.
SAMPLE_CONVERSATION = [
    {"role": "system", "content": " You are a helpful assistant.\n"},
    {"role": "user", "content": "Hello!  How are you?\n\n"},
    {"role": "assistant", "content": "\nFine, thanks. Café, naïve, 東京, 🙂 "},
    {"role": "user", "content": "  And 1+1=?"},
]
# A token id kept in a list or tuple: its slot (8 bytes) and its int object (32). A remembered
# prompt keeps two numbers a token (its id and where it ends): 8,000 tokens take ~650 kB.
ID_BYTES = 40


def prompt_bytes(text: str, ids, per_token: int = 2 * ID_BYTES) -> int:
    """The memory a remembered prompt and its numbers take, about."""
    return sys.getsizeof(text) + per_token * len(ids)


Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class Recent(Generic[Key, Value]):
    """The entries put last, at most `kept` of them in at most `max_bytes` (each one's size
    given as it is put): the oldest go first, and the newest always stays, whatever its size.
    Not locked: its owner holds a lock of its own."""

    def __init__(self, kept: int, max_bytes: int) -> None:
        self.kept, self.max_bytes = kept, max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Key, tuple[Value, int]] = OrderedDict()  # key: (value, size)

    def get(self, key: Key, default: Value | None = None) -> Value | None:
        entry = self._entries.get(key)
        if entry is None:
            return default
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Key, value: Value, size: int) -> None:
        self.pop(key)
        self._entries[key] = (value, size)
        self.nbytes += size
        while len(self._entries) > 1 and (
            len(self._entries) > self.kept or self.nbytes > self.max_bytes
        ):
            self.pop(next(iter(self._entries)))

    def pop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def items(self) -> list[tuple[Key, Value]]:
        """(key, value) pairs, oldest first."""
        return [(key, value) for key, (value, _) in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._entries))

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


class PromptTokenizer:
    def __init__(self, tokenizer, *, kept: int = 32, max_bytes: int = 16 * 2**20) -> None:
        self.tokenizer = tokenizer
        # Recent prompts remembered (a conversation's last turn takes one): at most `kept`, in
        # at most `max_bytes` (prompt_bytes); the newest always.
        self._recent = Recent(kept, max_bytes)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.incremental = False  # set by check()
        # The special token a chat template writes right after a reply's text, as (text, id),
        # if check() found one: the end of a turn.
        self.turn_end: tuple[str, int] | None = None
        self.tokenized_chars = 0  # characters tokenized so far (read by tests)
        self._lock = threading.Lock()

    def check(self, text: str, reply: str | None = None) -> bool:
        """Whether `text` (a rendered conversation) tokenizes, cut after any of its special
        tokens, into the same ids as whole. Sets `incremental`; with `reply` (the text of the
        conversation's reply, which `text` holds), also `turn_end`."""
        ids, ends = self._whole(text)
        self.incremental = all(
            self._whole(text[: ends[i]])[0] + self._whole(text[ends[i] :])[0] == ids
            for i, token in enumerate(ids[:-1])
            if token in self.special_ids
        ) and any(token in self.special_ids for token in ids[:-1])
        if self.incremental and reply and reply in text:
            after = text.index(reply) + len(reply)
            i = bisect.bisect_right(ends, after)  # the first token ending past the reply
            if i < len(ids) and ids[i] in self.special_ids and ends[i - 1] == after:
                self.turn_end = (text[after : ends[i]], ids[i])
        return self.incremental

    def remember(self, prompt: str, prompt_ids: list[int], reply: list[int], text: str) -> None:
        """`prompt` (a text `encode` gave `prompt_ids`) was answered with the ids `reply`,
        which decode to `text`, the reply as it is kept: the prompt, the reply and the end of
        the turn are remembered with those ids, for the next turn to reuse. Trailing whitespace
        the kept reply lost is left out with the tokens that wrote it (a reply cut at its
        length limit often ends in a line break). Nothing is remembered when prompts are
        tokenized whole, when `reply` holds a special token, when no run of its first tokens
        decodes to exactly `text` (leading whitespace lost, a character cut in two), or when
        `prompt` would now be tokenized otherwise than `prompt_ids`."""
        if not self.incremental or self.turn_end is None or not reply:
            return
        if any(token in self.special_ids for token in reply):
            return
        with self._lock:
            known = self._recent.get(prompt)
        if known is None:  # no longer remembered on its own (its reply was, say, regenerated)
            known = self._encode(prompt)
        if known[0] != list(prompt_ids):
            return
        decoded = self._decode(reply)
        while decoded != text and len(decoded) > len(text) and decoded.startswith(text):
            if not decoded[len(text) :].isspace():
                return
            reply = reply[:-1]
            decoded = self._decode(reply)
        if decoded != text or not reply:
            return
        ids, ends = known
        end_text, end_id = self.turn_end
        whole = prompt + text + end_text
        # (Only where each special token ends matters: a prompt is only ever cut after one. The
        # reply's tokens are all said to end where the reply does.)
        ends = ends + [len(prompt) + len(text)] * len(reply) + [len(whole)]
        with self._lock:
            self._recent.pop(prompt)  # the longer text holds all it could give
            ids = ids + reply + [end_id]
            self._recent.put(whole, (ids, ends), prompt_bytes(whole, ids))

    @property
    def nbytes(self) -> int:
        return self._recent.nbytes

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def encode(self, text: str) -> list[int]:
        ids, ends = self._encode(text)
        with self._lock:
            self._recent.put(text, (ids, ends), prompt_bytes(text, ids))
        return list(ids)

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        if self.incremental:
            with self._lock:
                recent = list(self._recent.items())
            cut, ids, ends = max(
                ((self._reusable(old, ids, ends, text), ids, ends) for old, (ids, ends) in recent),
                default=(0, [], []),
                key=lambda candidate: candidate[0],
            )
            if cut:
                count = bisect.bisect_right(ends, cut)  # the tokens ending by the cut
                tail_ids, tail_ends = self._whole(text[cut:])
                return ids[:count] + tail_ids, ends[:count] + [cut + end for end in tail_ends]
        return self._whole(text)

    def _reusable(self, old: str, ids: list[int], ends: list[int], text: str) -> int:
        """Characters of `text` whose ids `old`'s ids hold: up to the end of the last special
        token inside the prefix the two share (0 if none)."""
        shared = common_prefix_length(old, text)
        i = bisect.bisect_right(ends, shared) - 1
        while i >= 0 and ids[i] not in self.special_ids:
            i -= 1
        return ends[i] if i >= 0 else 0

    def _whole(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of `text` and where each token ends in it (characters)."""
        if not text:
            return [], []
        self.tokenized_chars += len(text)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]


class ReplyText:
    """The text a reply's new tokens add, decoded a few tokens at a time (as text-generation
    servers do it): the tokens since the last piece sent are decoded with the ones before them
    (which a tokenizer may need to place a space or finish a character) and the text the earlier
    ones alone give is cut off. Decoding the whole reply at every hand-over grew with the
    square of its length. The reply's leading whitespace is dropped, as the saved reply's is;
    a piece that ends in a half-decoded character waits for the next token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the reply's tokens so far
        self.start = 0  # ids from here on are decoded together with the new ones...
        self.sent = 0  # ...and those before this one gave the text already sent
        self.begun = False  # some text (not whitespace) has been sent

    def add(self, ids: list[int]) -> str:
        """The text `ids` (the reply's next tokens) add, or "" for now."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self.start : self.sent])
        after = self._decode(self.ids[self.start :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before) :]
        self.start, self.sent = self.sent, len(self.ids)
        if not self.begun:
            piece = piece.lstrip()
            self.begun = bool(piece)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
