"""The keys and values of the conversations being answered: one preallocated tensor, a row per
conversation, that the decoder's layers write and attend over in place."""

from __future__ import annotations

import torch

# The slot tensors grow in steps of this many positions.
CAPACITY_STEP = 256


def _capacity(positions: int) -> int:
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


class SlotCache:
    """Keys and values of the conversations being answered, in one tensor of shape (layers, 2,
    rows, key-value heads, positions, head size): [layer, 0] holds a layer's keys, [layer, 1]
    its values, and row i belongs to one conversation. `keys[layer]` and `values[layer]` are
    views of that tensor, (rows, heads, positions, head size), as the layers take them: each
    head's keys lie one after another, as attention reads them.

    One conversation's positions in every layer are one slice, so moving, exporting or loading
    a row is one copy, not one per layer and kind (each a call from Python that waits for the
    GIL while server threads hold it). Both sizes grow (by copying) as conversations join or
    get longer; every row has as many positions as the longest needs, so `max_bytes` (0: none)
    bounds rows x positions: the scheduler admits no more rows than fit, and cuts the positions
    back once the long conversation that needed them has left."""

    def __init__(self, layers: int, heads: int, head_dim: int, dtype, limit: int, max_bytes=0):
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.dtype, self.limit, self.max_bytes = dtype, limit, max_bytes
        self.position_bytes = layers * 2 * heads * head_dim * torch.empty(0, dtype=dtype).itemsize
        self.clear()

    def bytes_for(self, rows: int, positions: int) -> int:
        """The tensor's size for `rows` rows of `positions` positions (rounded up as held)."""
        return rows * _capacity(positions) * self.position_bytes

    def fits(self, rows: int, positions: int) -> bool:
        """Whether `rows` rows of `positions` positions stay within `max_bytes` (one row always
        does: a conversation as long as the window must be answerable)."""
        return rows <= 1 or not self.max_bytes or self.bytes_for(rows, positions) <= self.max_bytes

    def reserve(self, rows: int, positions: int) -> None:
        """Room for `rows` rows of `positions` positions: grown (by copying) if short, never
        cut. Positions double as they grow (fewer copies while a conversation gets longer),
        where that stays within `max_bytes`."""
        if rows <= self.rows and positions <= self.positions:
            return
        rows = max(rows, self.rows)
        if positions > self.positions:
            wanted = _capacity(positions)
            roomy = min(max(wanted, 2 * self.positions), max(self.limit, wanted))
            positions = roomy if self.fits(rows, roomy) else wanted
        else:
            positions = self.positions
        self.resize(rows, positions)

    def resize(self, rows: int, positions: int) -> None:
        """Exactly `rows` rows of `positions` positions (rounded up), keeping what the rows
        and positions they share hold: the caller knows that no row has more to keep."""
        positions = _capacity(positions)
        if (rows, positions) == (self.rows, self.positions):
            return
        data = torch.zeros(
            (self.layers, 2, rows, self.heads, positions, self.head_dim), dtype=self.dtype
        )
        kept_rows, kept = min(rows, self.rows), min(positions, self.positions)
        data[:, :, :kept_rows, :, :kept] = self.data[:, :, :kept_rows, :, :kept]
        self._hold(data)

    def _hold(self, data: torch.Tensor) -> None:
        self.data = data
        self.rows, self.positions = data.shape[2], data.shape[4]
        self.keys = list(data[:, 0].unbind()) if self.rows else []
        self.values = list(data[:, 1].unbind()) if self.rows else []

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def clear(self) -> None:
        """Free the tensors (they are made again as needed)."""
        self._hold(torch.empty((self.layers, 2, 0, self.heads, 0, self.head_dim), dtype=self.dtype))

    def move(self, source: int, target: int, length: int) -> None:
        self.data[:, :, target, :, :length] = self.data[:, :, source, :, :length]

    def export(self, row: int, length: int) -> torch.Tensor:
        """A copy of one row's first `length` positions: (layers, 2, heads, length, head size)."""
        return self.data[:, :, row, :, :length].clone(memory_format=torch.contiguous_format)

    def load(self, row: int, stored: torch.Tensor, length: int) -> None:
        """Put the first `length` positions of an exported tensor into a row."""
        self.data[:, :, row, :, :length] = stored[:, :, :, :length]
