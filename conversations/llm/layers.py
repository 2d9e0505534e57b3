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
from typing import Final

import torch
import torch.nn.functional as F

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


# From this many rows of input (prompt tokens, or replies in one step) on, a quantized matrix
# multiplies with its bf16 copy, if it has one: the quantized kernels read the weights once per
# row, right for decoding a few rows, 3x slower than bf16 for a prompt.
DENSE_ROWS = 16


@script
def multiply(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    dense: torch.Tensor,
    fmt: str,
    dense_rows: int,
) -> torch.Tensor:
    """x @ W.T for a matrix W in format `fmt` (see decoder._Linear), with its scales (int4: one
    scale and minimum per group of inputs, shaped (groups, outputs, 2); int8: one per output) and
    its bf16 copy, used from `dense_rows` rows of input on (empty tensors where absent; 0: never).
    """
    if fmt != "int4" and fmt != "int8":
        return F.linear(x, weight)
    flat = x.reshape(-1, x.size(-1))
    if dense_rows > 0 and dense.numel() > 0 and flat.size(0) >= dense_rows:
        return F.linear(x, dense)
    if fmt == "int4":
        group = x.size(-1) // scale.size(0)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, group, scale)
    else:
        y = torch.ops.aten._weight_int8pack_mm(flat, weight, scale)
    return y.view(x.shape[:-1] + [-1])  # noqa: RUF005 (TorchScript has no starred lists)


class Linear(torch.nn.Module):
    """One matrix in its format; scripted, its format is a constant (the other branches of
    `multiply` are compiled away)."""

    fmt: Final[str]
    dense_rows: Final[int]

    def __init__(self, weight, scale, dense, fmt):
        super().__init__()
        self.weight, self.scale, self.dense, self.fmt = weight, scale, dense, fmt
        self.dense_rows = DENSE_ROWS

    def forward(self, x: torch.Tensor, use_dense: bool) -> torch.Tensor:
        rows = self.dense_rows if use_dense else 0
        return multiply(x, self.weight, self.scale, self.dense, self.fmt, rows)


class Layer(torch.nn.Module):
    """RMS norm, attention (queries, keys and values from one matrix, rotary embedding, keys and
    values written into the slot cache), RMS norm, SwiGLU. The residual stream and the norms
    are fp32; the matrices get their input in `dtype`."""

    heads: Final[int]
    kv_heads: Final[int]
    head_dim: Final[int]
    eps: Final[float]

    def __init__(self, qkv, out, gate_up, down, norms, *, heads, kv_heads, head_dim, eps, dtype):
        super().__init__()
        self.qkv, self.out, self.gate_up, self.down = qkv, out, gate_up, down
        self.input_norm, self.post_attention_norm = norms
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.eps = eps
        self.dtype = dtype
        half = head_dim // 2
        # rotate_half(x) is x with its halves swapped and the first one negated; the negation
        # is folded into the sin table (decoder._rope), the swap is this gather.
        self.half_turn = torch.cat([torch.arange(half, head_dim), torch.arange(half)])

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        use_dense: bool,
        slots: torch.Tensor | None,
        length: int,
        mask: torch.Tensor | None,
        runs: list[tuple[int, int, int]],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        batch, count = x.size(0), x.size(1)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        rotated = (heads + kv_heads) * head_dim
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps, self.dtype), use_dense)
        # Queries and keys turn together: (batch, count, heads + key-value heads, head size).
        qk = qkv[:, :, :rotated].reshape(batch, count, -1, head_dim)
        qk = qk * cos + qk.index_select(-1, self.half_turn) * sin
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:]
        v = qkv[:, :, rotated:].reshape(batch, count, kv_heads, head_dim)
        if slots is not None:
            attended = _attend_decoding(q, k, v, keys, values, slots, length, mask)
        else:
            attended = _attend_runs(q, k, v, keys, values, runs, masks)
        attended = attended.transpose(1, 2).reshape(batch, count, heads * head_dim)
        x = x + self.out(attended, use_dense)
        h = rms_norm(x, self.post_attention_norm, self.eps, self.dtype)
        gate, up = self.gate_up(h, use_dense).chunk(2, dim=-1)
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
        slots: torch.Tensor | None,
        length: int,
        mask: torch.Tensor | None,
        runs: list[tuple[int, int, int]],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """x: (batch, count, hidden) fp32, cos and sin: (batch, count, 1, head size); keys and
        values: the slot cache's tensors, one per layer.

        Two ways to attend. Decoding (`slots` given): row i of the batch is slot row i, its new
        key and value go to flat position slots[i] of a layer's (rows * positions) view, and it
        sees positions 0..length-1 (`mask` hides those past its own). Reading prompts (`slots`
        None): batch row i is run i, (slot row, start, count), whose tokens go to positions
        start..start+count-1 of that slot row; masks[i] lets each token see the row's earlier
        positions and the run up to itself (None: a causal run from position 0, or one token).
        """
        for index, layer in enumerate(self.layers):
            x = layer(
                x, cos, sin, keys[index], values[index], use_dense, slots, length, mask, runs, masks
            )
        return x


@script
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMS norm in fp32 (as the model's own), handed on in the activation type."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(dtype)


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
) -> torch.Tensor:
    rows = q.size(0)
    keys.view(-1, keys.size(2), keys.size(3)).index_copy_(0, slots, k[:, 0])
    values.view(-1, values.size(2), values.size(3)).index_copy_(0, slots, v[:, 0])
    return F.scaled_dot_product_attention(
        q,
        keys[:rows, :length].transpose(1, 2),
        values[:rows, :length].transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
    )


@script
def _attend_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[tuple[int, int, int]],
    masks: list[torch.Tensor | None],
) -> torch.Tensor:
    attended = torch.zeros_like(q)
    for i in range(len(runs)):
        row, start, count = runs[i]
        end = start + count
        keys[row, start:end].copy_(k[i, :count])
        values[row, start:end].copy_(v[i, :count])
        attended[i, :, :count] = F.scaled_dot_product_attention(
            q[i : i + 1, :, :count],
            keys[row : row + 1, :end].transpose(1, 2),
            values[row : row + 1, :end].transpose(1, 2),
            attn_mask=masks[i],
            is_causal=start == 0 and count > 1,
            enable_gqa=True,
        )[0]
    return attended
