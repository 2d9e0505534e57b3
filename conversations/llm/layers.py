"""The decoder's transformer layers as one TorchScript module: the loop over the layers, and the
few dozen torch calls each layer makes, run in torch's own interpreter instead of Python's.

Why: one decode step of SmolLM2 is about 1,500 small torch calls, and from Python each costs
microseconds more than its arithmetic. Scripted, a single-stream decode step went from 20.3 to
15.0 ms (int4), giving the same logits to the last bit. Scripting takes well under a second at
load and needs no compiler. (torch marks TorchScript deprecated in favour of torch.compile, which
needs a C++ compiler at run time and measured +19% for minutes of compiling; torch is pinned. If
scripting ever fails, the same code runs as plain Python: `script` says so in the log.)

(No `from __future__ import annotations` here: TorchScript reads the annotations.)
"""

import logging
import warnings
from typing import Final, NamedTuple

import torch
import torch.nn.functional as F

from . import native  # noqa: F401 (defines the chat:: operations, which the layers name)

logger = logging.getLogger(__name__)


def script(target):
    """`target` compiled by TorchScript (a module also frozen: its weights and formats become
    constants of one graph), or `target` itself if that fails."""
    try:
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
            if isinstance(target, torch.nn.Module):
                return torch.jit.freeze(torch.jit.script(target.eval()))
            return torch.jit.script(target)
    except Exception:
        logger.warning("TorchScript failed on %s; it runs as Python", target, exc_info=True)
        return target


class Norm(torch.nn.Module):
    """RMS norm in fp32, to the bit as the model's own (x * rsqrt(mean(x^2) + eps) * weight),
    handed on in the activation type (`scaled`: in fp32). With `smoothing` (one factor per
    channel: see weights.Int4Linear), `scaled(x, True)` gives the norm divided by it, as the int8
    product after the norm takes it: the division is folded into the weight."""

    def __init__(self, weight, eps, dtype, smoothing=None):
        super().__init__()
        self.weight = weight
        self.smoothed_weight = weight if smoothing is None else weight / smoothing
        # Tensors, not Python numbers: an operation with a number converts it every time.
        self.eps = torch.tensor(eps, dtype=torch.float32)
        self.width = torch.tensor(float(weight.numel()), dtype=torch.float32)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x).to(self.dtype)

    def scaled(self, x: torch.Tensor, smoothed: bool = False) -> torch.Tensor:
        """The norm in fp32, before the cast (a matrix casts what it needs)."""
        variance = (x * x).sum(-1, keepdim=True) / self.width  # what mean() computes
        weight = self.smoothed_weight if smoothed else self.weight
        return x * torch.rsqrt(variance + self.eps) * weight


class Attention(NamedTuple):
    """How the tokens of a pass attend. Decoding (`slots` given): token i belongs to slot row
    i, its key and value for head h go to slots[i * heads + h] of a layer's flat view of (rows *
    heads * positions) vectors, and it sees positions 0..length-1 (`mask`, added to the
    scores, hides those past its own).
    Reading prompts (`slots` None): the tokens are runs of equal length (the shorter padded at
    the end), run i being (slot row, start, count): its tokens go to positions
    start..start+count-1 of that slot row, and `mask` lets each see the row's earlier positions
    and the run up to itself, repeated once per query head that shares a key-value head. One
    run: shaped (group * count, start + count) (None: a causal run from position 0, or one
    token). Several runs attend in one call: `rows` holds their slot rows, `mask` all of their
    masks, (runs, 1, group * longest run, `length`), `length` being the furthest position a run
    reaches.

    `lengths` (decoding only): how many positions each row sees, for the decode-attention kernel
    of our own (native.py), which then attends instead of scaled_dot_product_attention and needs
    no mask; None: that kernel is not used. `native_run` (reading prompts): each run attends
    with our prefill-attention kernel, which needs no mask either (nor `rows` or `length`)."""

    slots: torch.Tensor | None
    length: int
    mask: torch.Tensor | None
    runs: list[tuple[int, int, int]]
    rows: torch.Tensor | None
    lengths: torch.Tensor | None
    native_run: bool


class Layer(torch.nn.Module):
    """RMS norm, attention (queries, keys and values from one matrix, rotary embedding, keys and
    values written into the slot cache), RMS norm, SwiGLU. The residual stream and the norms
    are fp32; a norm hands its matrix its fp32 output, which the matrix casts to the activation
    type for its kernel or quantizes as it is (the int8 product)."""

    heads: Final[int]
    kv_heads: Final[int]
    head_dim: Final[int]
    half: Final[int]

    def __init__(self, qkv, out, gate_up, down, norms, *, heads, kv_heads, head_dim):
        super().__init__()
        self.qkv, self.out, self.gate_up, self.down = qkv, out, gate_up, down
        self.input_norm, self.post_attention_norm = norms
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # rotate_half(x) is x with its halves swapped and the first one negated; the negation
        # is folded into the sin table (decoder._rope), the swap is a roll by half a head
        # (a gather with an index measured 35x slower on a prompt's 288 tokens).
        self.half = head_dim // 2

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        use_dense: bool,
        attention: Attention,
    ) -> torch.Tensor:
        tokens = x.size(0)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # (A norm's output goes to the int8 product smoothed: see weights.Int4Linear.)
        h = self.input_norm.scaled(x, self.qkv.int8_input(tokens, use_dense))
        qkv = self.qkv(h, use_dense)
        qk, v = qkv.split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=1)
        # Queries and keys turn together: (tokens, heads + key-value heads, head size).
        qk = qk.view(tokens, heads + kv_heads, head_dim)
        qk = qk * cos + torch.roll(qk, self.half, 2) * sin
        q, k = qk.split([heads, kv_heads], dim=1)
        v = v.view(tokens, kv_heads, head_dim)
        slots = attention.slots
        if slots is not None:
            attended = _attend_decoding(
                q, k, v, keys, values, slots, attention.length, attention.mask, attention.lengths
            )
        else:
            attended = _attend_runs(
                q,
                k,
                v,
                keys,
                values,
                attention.runs,
                attention.rows,
                attention.mask,
                attention.length,
                attention.native_run,
            )
        x = x + self.out(attended, use_dense)
        h = self.post_attention_norm.scaled(x, self.gate_up.int8_input(tokens, use_dense))
        gate, up = self.gate_up(h, use_dense).chunk(2, dim=1)
        return x + self.down(F.silu(gate) * up, use_dense)


class Layers(torch.nn.Module):
    """The layer stack (scripted, its loop is unrolled: one graph for the whole model)."""

    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        use_dense: bool,
        attention: Attention,
    ) -> torch.Tensor:
        """x: (tokens, hidden) fp32, cos and sin: (tokens, 1, head size); keys and values: the
        slot cache's tensors, one per layer.

        `attention` says how the tokens attend (see Attention).
        """
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, keys[index], values[index], use_dense, attention)
        return x


@script
def _attend_decoding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    length: int,
    mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """q: (rows, heads, head size), k and v: (rows, key-value heads, head size); returns
    (rows, heads * head size)."""
    rows, head_dim = q.size(0), q.size(2)
    keys.view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
    values.view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))
    if lengths is not None:
        return torch.ops.chat.decode_attention(q, keys, values, lengths)
    attended = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys[:rows, :, :length],
        values[:rows, :, :length],
        attn_mask=mask,
        enable_gqa=True,
    )
    return attended.view(rows, -1)


@script
def _store_runs(
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[tuple[int, int, int]],
):
    """The runs' keys and values, k and v (runs, tokens, key-value heads, head size), into their
    slot rows (their padding left out)."""
    for i in range(len(runs)):
        row, start, used = runs[i]
        keys[row, :, start : start + used].copy_(k[i, :used].transpose(0, 1))
        values[row, :, start : start + used].copy_(v[i, :used].transpose(0, 1))


@script
def _attend_runs_natively(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[tuple[int, int, int]],
) -> torch.Tensor:
    """As _attend_runs, each run through our prefill-attention kernel (its padding is not
    attended: zeros, thrown away)."""
    batch = len(runs)
    count = q.size(0) // batch
    q = q.view(batch, count, q.size(1), q.size(2))
    k = k.view(batch, count, k.size(1), k.size(2))
    v = v.view(batch, count, v.size(1), v.size(2))
    _store_runs(k, v, keys, values, runs)
    attended: list[torch.Tensor] = []
    for i in range(batch):
        row, start, used = runs[i]
        out = torch.ops.chat.prefill_attention(q[i, :used], keys, values, row, start)
        attended.append(F.pad(out, [0, 0, 0, count - used]))
    return torch.cat(attended)


@script
def _attend_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[tuple[int, int, int]],
    rows: torch.Tensor | None,
    mask: torch.Tensor | None,
    length: int,
    native_run: bool,
) -> torch.Tensor:
    """q: (tokens, heads, head size), k and v: (tokens, key-value heads, head size), tokens
    being len(runs) runs of equal length; returns (tokens, heads * head size). `rows`, `mask`,
    `length` and `native_run` as in Attention."""
    batch = len(runs)
    count = q.size(0) // batch
    if native_run:
        return _attend_runs_natively(q, k, v, keys, values, runs)
    q = q.view(batch, count, q.size(1), q.size(2)).transpose(1, 2)
    k = k.view(batch, count, k.size(1), k.size(2))
    v = v.view(batch, count, v.size(1), v.size(2))
    heads, kv_heads, head_dim = q.size(1), k.size(2), q.size(3)
    _store_runs(k, v, keys, values, runs)
    if rows is not None:
        # The runs' rows of the slot tensors, up to the furthest position: one call, its
        # query heads grouped by key-value head as below. (A padded query sees whatever its
        # row holds up there: its output is thrown away.)
        attended = F.scaled_dot_product_attention(
            q.reshape(batch, kv_heads, -1, head_dim),
            keys[:, :, :length].index_select(0, rows),
            values[:, :, :length].index_select(0, rows),
            attn_mask=mask,
        ).view(batch, heads, count, head_dim)
        return attended.transpose(1, 2).reshape(batch * count, -1)
    # One run (of `count` tokens: nothing is padded).
    row, start, _ = runs[0]
    end = start + count
    if mask is None:
        attended = F.scaled_dot_product_attention(
            q,
            keys[row : row + 1, :, :end],
            values[row : row + 1, :, :end],
            is_causal=start == 0 and count > 1,
            enable_gqa=True,
        )
    else:
        # The query heads that share a key-value head go as one longer run of queries: each
        # key and value is read once, not once per query head (~25% faster over a long
        # history). The mask is the run's mask repeated once per head of a group.
        attended = F.scaled_dot_product_attention(
            q.reshape(1, kv_heads, -1, head_dim),
            keys[row : row + 1, :, :end],
            values[row : row + 1, :, :end],
            attn_mask=mask,
        ).view(1, heads, count, head_dim)
    return attended.transpose(1, 2).reshape(count, -1)
