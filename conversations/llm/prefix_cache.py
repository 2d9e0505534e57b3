"""Keys and values of the last turn of each conversation, kept so the next turn does not
recompute them.

The history is still rebuilt from the database every turn; this cache only skips the part of the
prompt whose tokens are exactly the ones already computed. An edited or regenerated history
shares a shorter prefix (or none), so only the part before the tokens first differ is reused:
nothing stale ever is.

A conversation's keys and values hold its owner's text, and how much of a prompt is reused shows
in how soon the reply starts: an entry lends its start only to conversations of the same owner.
What every user shares (the template's header and the server's default system prompt) is one
entry of its own, computed from that public text alone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CacheKey:
    """Whose keys and values an entry holds: a conversation, and the user who owns it."""

    owner: str
    conversation: str


def owner_of(key: Hashable) -> str | None:
    """The owner a key names (None: a key of another kind, which lends to no other key)."""
    return key.owner if isinstance(key, CacheKey) else None


@dataclass(frozen=True)
class CachedPrefix:
    tokens: list[int]  # the tokens whose keys and values `cache` holds, in order
    cache: Any  # a tensor (kv_cache.SlotCache.export): position i holds tokens[i]

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
    """A least-recently-used store of CachedPrefix by key (a conversation), bounded in bytes,
    and one entry every key may read: what all users share (see `share`)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, CachedPrefix] = OrderedDict()
        self._shared: CachedPrefix | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, key: Hashable, prompt: list[int]) -> tuple[Any | None, int]:
        """Remove and return (cache, reused tokens) for a prompt: the key's entry, of which the
        first `reused` positions hold the longest prefix it shares with `prompt` (leaving at
        least the prompt's last token to compute). (None, 0) when nothing can be reused.

        A conversation with nothing of its own to reuse (a new one) borrows the start of the
        entry that shares the longest prefix with its prompt among its owner's other
        conversations and the shared entry: the same system prompt and template header are the
        same tokens at the same positions, so their keys and values are the same. Another
        owner's entry never lends (the time to the first token would tell whether it holds the
        prompt). A borrowed entry stays (its positions are copied, never changed)."""
        owner = owner_of(key)
        with self._lock:
            entry = self._entries.pop(key, None)
            reuse = reusable_length(entry.tokens, prompt) if entry is not None else 0
            if reuse <= 0:
                entry, reuse = None, 0
                lenders = [e for k, e in self._entries.items() if owner and owner_of(k) == owner]
                for other in [*lenders, *([self._shared] if self._shared else [])]:
                    shared = reusable_length(other.tokens, prompt)
                    if shared > reuse:
                        entry, reuse = other, shared
        if entry is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        return entry.cache, reuse

    def share(self, tokens: list[int], cache: Any) -> None:
        """Keep `cache` (holding `tokens`: text every user may read) for every key to borrow.
        It stays outside the least-recently-used order: nothing a user does evicts it."""
        with self._lock:
            self._shared = CachedPrefix(tokens=list(tokens), cache=cache)

    def put(self, key: Hashable, tokens: list[int], cache: Any) -> None:
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

    def discard_where(self, matches: Callable[[Hashable], bool]) -> None:
        """Drop the entries whose key `matches` (a deleted conversation's, or user's)."""
        with self._lock:
            for key in [k for k in self._entries if matches(k)]:
                del self._entries[key]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[tuple[Hashable, CachedPrefix]]:
        """The kept (key, entry) pairs, least recently used first: a copy to read, which leaves
        the order as it is (only `take` and `put` move an entry)."""
        with self._lock:
            return list(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)
