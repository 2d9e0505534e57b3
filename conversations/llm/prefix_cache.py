"""Keys and values of the last turn of each conversation, kept so the next turn does not
recompute them.

The history is still rebuilt from the database every turn; this cache only skips the part of the
prompt whose tokens are exactly the ones already computed. An edited or regenerated history
shares a shorter prefix (or none), so only the part before the tokens first differ is reused:
nothing stale ever is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class CachedPrefix:
    tokens: list[int]  # the tokens whose keys and values `cache` holds, in order
    cache: Any  # a tensor (decoder.SlotCache.export): position i holds tokens[i]

    @property
    def nbytes(self) -> int:
        """What the entry keeps alive: its tensor's whole storage (a view's base included)."""
        return held_bytes(self.cache)


def held_bytes(tensor: Any) -> int:
    storage = getattr(tensor, "untyped_storage", None)
    return storage().nbytes() if storage is not None else tensor.nbytes


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two lists or strings (bisected on slices, which
    compare in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def reusable_length(tokens: list[int], prompt: list[int]) -> int:
    """Positions computed for `tokens` that `prompt` can take: the prefix they share, leaving
    the prompt's last token to compute."""
    if not tokens or not prompt or tokens[0] != prompt[0]:
        return 0
    return min(common_prefix_length(tokens, prompt), len(prompt) - 1)


class PrefixCache:
    """A least-recently-used store of CachedPrefix by key (a conversation), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, key: str, prompt: list[int]) -> tuple[Any | None, int]:
        """Remove and return (cache, reused tokens) for a prompt: the key's entry, of which the
        first `reused` positions hold the longest prefix it shares with `prompt` (leaving at
        least the prompt's last token to compute). (None, 0) when nothing can be reused.

        A conversation with nothing of its own to reuse (a new one) borrows the start of the
        entry that shares the longest prefix with its prompt: the same system prompt and
        template header are the same tokens at the same positions, so their keys and values
        are the same. A borrowed entry stays (its positions are copied, never changed)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            reuse = reusable_length(entry.tokens, prompt) if entry is not None else 0
            if reuse <= 0:
                entry, reuse = None, 0
                for other in self._entries.values():
                    shared = reusable_length(other.tokens, prompt)
                    if shared > reuse:
                        entry, reuse = other, shared
        if entry is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        return entry.cache, reuse

    def put(self, key: str, tokens: list[int], cache: Any) -> None:
        """Keep `cache` (holding `tokens`) for the key's next turn, evicting the least recently
        used entries beyond the byte budget. A view into a larger tensor is kept as a copy of
        its own, so that the budget counts what is really held."""
        if held_bytes(cache) > cache.nbytes:
            cache = cache.clone()
        entry = CachedPrefix(tokens=list(tokens), cache=cache)
        if self.max_bytes <= 0 or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
