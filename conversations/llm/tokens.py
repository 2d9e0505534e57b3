"""Token ids of prompts that grow turn by turn, without tokenizing the whole history again; and
the text of a reply as its tokens come, without decoding the whole reply again.

A conversation's next prompt is its last prompt with the reply and a new message added. Special
tokens (ChatML's <|im_start|> and <|im_end|>, for one) cut a text into pieces that a tokenizer
encodes one by one, so the ids up to the last special token two prompts share can be reused as
they are, and only the rest is tokenized. Whether this tokenizer really encodes the pieces
independently is checked once, on a sample conversation (a special token that swallows the
spaces next to it, or a prefix space added to the start of every text, would break it); if it
does not, every prompt is tokenized whole.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from .prefix_cache import common_prefix_length

# Rendered with the model's chat template to check the tokenizer: spaces, line breaks and
# characters of several bytes on both sides of the special tokens.
SAMPLE_CONVERSATION = [
    {"role": "system", "content": " You are a helpful assistant.\n"},
    {"role": "user", "content": "Hello!  How are you?\n\n"},
    {"role": "assistant", "content": "\nFine, thanks. Café, naïve, 東京, 🙂 "},
    {"role": "user", "content": "  And 1+1=?"},
]


class PromptTokenizer:
    def __init__(self, tokenizer, *, kept: int = 16) -> None:
        self.tokenizer = tokenizer
        self.kept = kept  # recent prompts remembered
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.incremental = False  # set by check()
        self.tokenized_chars = 0  # characters tokenized so far (read by tests)
        self._recent: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, text: str) -> bool:
        """Whether `text` (a rendered conversation) tokenizes, cut after any of its special
        tokens, into the same ids as whole. Sets `incremental`."""
        ids, ends = self._whole(text)
        self.incremental = all(
            self._whole(text[: ends[i]])[0] + self._whole(text[ends[i] :])[0] == ids
            for i, token in enumerate(ids[:-1])
            if token in self.special_ids
        ) and any(token in self.special_ids for token in ids[:-1])
        return self.incremental

    def encode(self, text: str) -> list[int]:
        ids, ends = self._encode(text)
        with self._lock:
            self._recent[text] = (ids, ends)
            self._recent.move_to_end(text)
            while len(self._recent) > self.kept:
                self._recent.popitem(last=False)
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
