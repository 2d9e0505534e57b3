"""Which reply holds which row of the slot cache, and what moves between the rows and the prefix
cache: the scheduler decides who runs, this keeps the rows in step with it.

Row i is held by the i-th reply in flight; a reply that leaves gives its row to the last one
(one copy). When the last reply in flight leaves, its conversation's keys and values may stay in
row 0 ("parked"): a person's next message in that conversation starts from them with nothing
copied. They go to the prefix cache (a copy) only when the row is wanted for something else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .prefix_cache import PrefixCache, reusable_length

if TYPE_CHECKING:
    from .kv_cache import SlotCache
    from .reply_request import ReplyRequest

# Every slot row has as many positions as the longest conversation in flight needs: once that
# one has left, the positions are cut back to what the rest need when that gives back more than
# TRIM_BYTES and over half the tensor (one copy of what the rows hold): under steady load no idle
# moment comes to free them.
TRIM_BYTES = 64 * 2**20


class SlotRows:
    """The replies holding slot rows, in row order, and the conversation parked in row 0.
    `cache` is the decoder's SlotCache (set once the model is loaded)."""

    def __init__(self, prefix_cache: PrefixCache) -> None:
        self.prefix_cache = prefix_cache
        self.cache: SlotCache | None = None
        self._held: list[ReplyRequest] = []
        # (cache key, tokens) of the conversation whose keys and values sit in row 0 while no
        # reply is in flight, or None.
        self.parked: tuple[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[ReplyRequest]:
        return iter(self._held)

    def fits_with(self, request: ReplyRequest) -> bool:
        """Whether `request` may take a row beside the replies in flight within the slot
        tensor's bytes (a lone reply always may)."""
        if not self._held:
            return True
        need = max(positions_needed(r) for r in [*self._held, request])
        return self.cache.fits(len(self._held) + 1, need)

    def give_row(self, request: ReplyRequest) -> None:
        """The next row to `request`. If its conversation is parked, it gets row 0 (no reply is
        in flight) with what that holds; else the parked conversation goes to the prefix cache."""
        if self.parked is not None and self.parked[0] == request.cache_key:
            _, tokens = self.parked
            self.parked = None
            request.filled = request.reused_tokens = reusable_length(tokens, request.prompt)
            self.prefix_cache.hits += request.reused_tokens > 0
        self.unpark()
        request.row = len(self._held)
        self._held.append(request)

    def make_room(self, joined: list[ReplyRequest]) -> None:
        """Room in the slot tensors for every reply in flight, then the keys and values the
        prefix cache holds of each of those `joined` that start empty. One reservation for all
        of them: the tensors are copied once, not once per row. Rows or positions that nothing
        in flight needs are dropped if keeping them would take the tensor past its bytes."""
        cache = self.cache
        rows, need = len(self._held), max(positions_needed(r) for r in self._held)
        if cache.fits(max(rows, cache.rows), max(need, cache.positions)):
            cache.reserve(rows, need)
        else:
            cache.resize(rows, need)
        for request in joined:
            if request.cache_key is not None and request.filled == 0:
                stored, reuse = self.prefix_cache.take(request.cache_key, request.prompt)
                if stored is not None:
                    cache.load(request.row, stored, reuse)
                    request.filled = request.reused_tokens = reuse

    def release(self, request: ReplyRequest, *, park: bool) -> None:
        """Let go of `request`'s row, moving the last row into it. What it computed is kept if
        `request.keep`: parked in place with `park`, else copied to the prefix cache."""
        if request.keep and park:
            self.parked = (request.cache_key, request.tokens[: request.filled])
        elif request.keep:
            self._store(request.row, request.cache_key, request.tokens[: request.filled])
        last = self._held[-1]
        if last is not request:
            self.cache.move(last.row, request.row, last.filled)
            last.row = request.row
            self._held[request.row] = last
        self._held.pop()
        request.row = -1

    def trim(self) -> None:
        """Cut the rows' positions back to what the replies in flight and the parked
        conversation need, when that gives back enough (see TRIM_BYTES)."""
        cache = self.cache
        needs = [positions_needed(r) for r in self._held]
        if self.parked is not None:
            needs.append(len(self.parked[1]))
        if not needs or not cache.rows:
            return  # nothing to keep: an idle moment frees the whole tensor
        kept = cache.bytes_for(cache.rows, max(needs))
        if cache.nbytes - kept > max(TRIM_BYTES, kept):
            cache.resize(cache.rows, max(needs))

    def unpark(self) -> None:
        """Row 0 is wanted: copy the parked conversation to the prefix cache."""
        if self.parked is not None:
            key, tokens = self.parked
            self.parked = None
            self._store(0, key, tokens)

    def free(self) -> None:
        """Give the slot tensors back (no reply is in flight), the parked conversation to the
        prefix cache first."""
        self.unpark()
        self.cache.clear()

    def forget(self, matches: Callable[[object], bool]) -> None:
        """Drop the parked conversation if its cache key `matches`."""
        if self.parked is not None and matches(self.parked[0]):
            self.parked = None

    def _store(self, row: int, key: str, tokens: list[int]) -> None:
        self.prefix_cache.put(key, tokens, self.cache.export(row, len(tokens)))


def positions_needed(request: ReplyRequest) -> int:
    """Positions a reply may fill: its prompt and its whole budget."""
    return len(request.prompt) + request.max_new_tokens
