"""The formats the decoder keeps its matrices in, one module class each (as gpt-fast's
quantize.py): each is made once, at load, from a transformers layer's fp32 matrix, and multiplies
with the kernel that reads its format. `linear` and `head` pick the format of a matrix.

- DenseLinear: plain bf16 or fp32 ("bf16", "fp32").
- Int8Linear: int8, one scale per output row (torch's `_weight_int8pack_mm`).
- Int4Linear: int4 in groups of INT4_GROUP inputs with a scale and a minimum each (torch's
  `_weight_int4pack_mm_for_cpu`), with an int8 copy for FBGEMM for steps of several replies.
- NativeInt4Linear: the same int4 levels, packed for our own kernel (quantized_linear.cpp).
- NativeInt8Head, FbgemmInt8Head: the output head in 8 bits, on our kernel or FBGEMM's.

The quantized kernels read the weights again for every four rows of input (ours: every eight):
right for decoding a few rows, several times slower than a bf16 product for a prompt. So a
quantized layer matrix also keeps a bf16 copy, for inputs of `dense_rows` rows or more.
docs/engine.md has the measurements behind each choice.

(No `from __future__ import annotations` here: TorchScript reads the annotations.)
"""

import logging
import warnings
from typing import Any, Final

import torch
import torch.nn.functional as F

from . import calibration, native

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int4", "int8", "bf16", "fp32")
INT4_GROUP = 32
# From this many rows of input (prompt tokens, or replies in one step) on, a quantized layer
# matrix multiplies with its bf16 copy, which reads the weights once for all rows.
DENSE_ROWS = 16
# The same with our int4 kernel, which reads the weights once for every eight rows: faster than
# the bf16 copy up to about 40 (a follow-up's ~25 new tokens over 130 positions: 19 ms, against
# 31 with the copies).
NATIVE_DENSE_ROWS = 40
# Without FBGEMM, the output head multiplies with a bf16 copy from this many rows on.
HEAD_DENSE_ROWS = 5
# On torch's kernels, from this many rows on (below DENSE_ROWS), the query-key-value and gate-up
# matrices multiply as int8 x int8 with FBGEMM (Int4Linear), whose cost barely grows with rows
# where the int4 kernel's doubles from four rows to eight.
BATCH_INT8_ROWS = 5


def activation_type(fmt: str) -> torch.dtype:
    """The type activations and keys and values take with weights in `fmt`."""
    return torch.float32 if fmt == "fp32" else torch.bfloat16


# Choosing a format


def linear(
    weight: torch.Tensor,
    fmt: str,
    *,
    dense_rows: int = 0,
    native_int4: bool = False,
    batch_rows: int = 0,
    peaks: torch.Tensor | None = None,
) -> "Matrix":
    """`weight` (outputs, inputs) as a layer matrix in `fmt`. A quantized one keeps a bf16 copy
    for inputs of `dense_rows` rows or more (0: none). "int4" goes to our own kernel with
    `native_int4` where it takes the matrix, else to torch's, which keeps an int8 copy for
    inputs of `batch_rows` rows or more (0: none), smoothed with the `peaks` of its input
    channels. A matrix whose inputs are not in groups of INT4_GROUP is kept as int8."""
    weight = weight.detach().float()
    dtype = activation_type(fmt)
    if fmt not in ("int4", "int8"):
        return DenseLinear(weight, dtype)
    dense = _dense_copy(weight) if dense_rows else torch.empty(0)
    if fmt == "int8" or weight.shape[1] % INT4_GROUP:
        return Int8Linear(weight, dense, dense_rows, dtype)
    levels, scale, low = _in_groups(weight, 4, INT4_GROUP)
    if native_int4 and native.quantized_fits(weight.shape, scale, low):
        return NativeInt4Linear(native.pack(levels, scale, low, bits=4), dense, dense_rows, dtype)
    batch, smoothing = _int8_copy(weight, peaks) if batch_rows else (None, None)
    if batch is None:
        batch_rows = 0
    return Int4Linear(levels, scale, low, dense, dense_rows, dtype, batch, batch_rows, smoothing)


def head(weight: torch.Tensor, fmt: str, *, native_int8: bool = False) -> "Matrix":
    """The output head in `fmt`. It turns each hidden state into the whole vocabulary's scores,
    where int4 costs measurably more perplexity than in the layers: the quantized formats keep
    it in 8 bits (the GGUF's head is 8-bit too), on our own kernel with `native_int8` where it
    takes the matrix, else FBGEMM's, else torch's weight-only int8 kernel."""
    if fmt not in ("int4", "int8"):
        return linear(weight, fmt)
    weight = weight.detach().float()
    if native_int8 and weight.shape[1] % native.GROUP == 0:
        levels, scale, low = _in_groups(weight, 8, native.GROUP)
        if native.quantized_fits(weight.shape, scale, low):
            return NativeInt8Head(native.pack(levels, scale, low, bits=8))
    quantized, scale = _int8_rows(weight)
    # (The scale in bf16, as Int8Linear keeps it.) FBGEMM holds its own copy of the weights.
    packed = _fbgemm_pack(quantized, scale.to(torch.bfloat16))
    if packed is None:
        dtype = activation_type(fmt)
        return Int8Linear(weight, _dense_copy(weight), HEAD_DENSE_ROWS, dtype)
    return FbgemmInt8Head(packed, quantized.nbytes)


def layer_matrices(
    layer: Any, fmt: str, peaks: tuple | None = None, *, native_int4: bool = False
) -> tuple["Matrix", "Matrix", "Matrix", "Matrix"]:
    """A transformers Llama layer's matrices in `fmt`: (query-key-value, out, gate-up, down),
    the query, key and value projections as one matrix and the gate and up ones as another.
    `peaks`: the input peaks of the first and third (calibration.input_peaks), to smooth their
    int8 copies; None: not smoothed."""
    attention, mlp = layer.self_attn, layer.mlp
    attention_peaks, mlp_peaks = peaks or (None, None)

    # Without AVX-512 BF16, bf16 products are emulated in fp32 and prompts read faster through
    # the AVX2 kernel of our own: no bf16 copies there (and ~200 MB less memory).
    target = native.loaded_target()
    avx2_only = native_int4 and target is not None and target.registers == 256
    dense_rows = 0 if avx2_only else NATIVE_DENSE_ROWS if native_int4 else DENSE_ROWS

    def matrix(weight, **batches):
        return linear(weight, fmt, dense_rows=dense_rows, native_int4=native_int4, **batches)

    qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    # (Out and down keep no int8 copy: their inputs are not a norm's output, and int8 inputs to
    # down cost perplexity even smoothed.)
    return (
        # Unsmoothed, int8 inputs here cost 2% perplexity: only with the peaks.
        matrix(
            qkv,
            batch_rows=BATCH_INT8_ROWS if attention_peaks is not None else 0,
            peaks=attention_peaks,
        ),
        matrix(attention.o_proj.weight),
        matrix(
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            batch_rows=BATCH_INT8_ROWS,
            peaks=mlp_peaks,
        ),
        matrix(mlp.down_proj.weight),
    )


# The formats


class Matrix(torch.nn.Module):
    """y = x @ W.T. It takes x (rows, inputs) in fp32 or in the activation type and gives y in
    the type its kernel gives (the activation type, or fp32 for the heads); `use_dense` allows
    the bf16 copy of a quantized matrix. `weight_bytes`: what a decode step reads of it."""

    def __init__(self, weight_bytes: int) -> None:
        super().__init__()
        self.weight_bytes = weight_bytes
        # The factor by which its input channels come divided (see Int4Linear), or None.
        self.smoothing = None

    @torch.jit.export
    def int8_input(self, rows: int, use_dense: bool) -> bool:
        """Whether an input of `rows` rows goes to an int8 product, smoothed (see Int4Linear)."""
        return False


class DenseLinear(Matrix):
    """A plain matrix in the activation type."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        weight = weight.to(dtype)
        super().__init__(weight.nbytes)
        self.weight, self.dtype = weight, dtype

    def forward(self, x: torch.Tensor, use_dense: bool = True) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight)


class QuantizedLinear(Matrix):
    """A quantized matrix (a subclass's `quantized` multiplies with it) and its bf16 copy
    (`dense`, empty without), which takes inputs of `dense_rows` rows or more."""

    dense_rows: Final[int]

    def __init__(self, weight_bytes: int, dense: torch.Tensor, dense_rows: int, dtype) -> None:
        super().__init__(weight_bytes)
        self.dense = dense
        self.dense_rows = dense_rows if dense.numel() else 0
        self.dtype = dtype

    def forward(self, x: torch.Tensor, use_dense: bool = True) -> torch.Tensor:
        if self._dense(x.size(0), use_dense):
            return _dense_product(x.to(self.dtype), self.dense)
        return self.quantized(x)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, rows: int, use_dense: bool) -> bool:
        return use_dense and self.dense_rows > 0 and rows >= self.dense_rows


class Int8Linear(QuantizedLinear):
    """int8 with one scale per output row, symmetric (torch's weight-only int8 kernel)."""

    def __init__(self, weight: torch.Tensor, dense: torch.Tensor, dense_rows: int, dtype) -> None:
        quantized, scale = _int8_rows(weight)
        super().__init__(quantized.nbytes, dense, dense_rows, dtype)
        self.weight, self.scale = quantized, scale.to(torch.bfloat16)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(self.dtype), self.weight, self.scale)


class Int4Linear(QuantizedLinear):
    """int4 in groups of INT4_GROUP inputs, each with a scale and a minimum, packed for torch's
    CPU kernel (the layout torchao's int4 weight-only quantization uses).

    That kernel's cost doubles from four rows to eight, so a matrix may also keep an int8 copy
    packed for FBGEMM's dynamic kernel (`batch`), which takes inputs of `batch_rows` rows or more
    that do not go to the bf16 copy: it quantizes its fp32 input to int8 on the fly, one scale
    for the whole input (the rows are a norm's output, all of about one size), and multiplies in
    integers. A few channels of a norm's output run far larger than the rest, and one scale for
    all of them leaves the others few levels: so the copy may be smoothed (SmoothQuant), its
    input channel j multiplied by `smoothing[j]`, by which the norm before it then divides its
    output (layers.Norm), so the product is the same but the large channels shrink."""

    batch_rows: Final[int]

    def __init__(
        self,
        levels: torch.Tensor,
        scale: torch.Tensor,
        low: torch.Tensor,
        dense: torch.Tensor,
        dense_rows: int,
        dtype,
        batch=None,
        batch_rows: int = 0,
        smoothing: torch.Tensor | None = None,
    ) -> None:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)
        super().__init__(weight.nbytes, dense, dense_rows, dtype)
        self.weight = weight
        # The kernel reads w = (level - 8) * scale + zero, so zero = low + 8 * scale.
        zero = low + 8 * scale
        self.scale = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16)
        self.batch, self.batch_rows, self.smoothing = batch, batch_rows, smoothing

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch is not None and x.size(0) >= self.batch_rows:
            return torch.ops.quantized.linear_dynamic(x.float(), batch, False).to(self.dtype)
        group = x.size(1) // self.scale.size(0)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.dtype), self.weight, group, self.scale
        )

    @torch.jit.export
    def int8_input(self, rows: int, use_dense: bool) -> bool:
        batch = self.batch
        return batch is not None and rows >= self.batch_rows and not self._dense(rows, use_dense)


class NativeInt4Linear(QuantizedLinear):
    """The int4 levels, scales and minimums of Int4Linear packed for our own kernel
    (native.pack), which rounds each row of the input to int8 in groups of 32 and multiplies
    with integer dot products, reading the weights once for up to eight rows."""

    def __init__(self, packed: torch.Tensor, dense: torch.Tensor, dense_rows: int, dtype) -> None:
        super().__init__(packed.nbytes, dense, dense_rows, dtype)
        self.weight = packed

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.chat.int4_linear(x.to(self.dtype), self.weight)


class NativeInt8Head(Matrix):
    """The head in 8-bit levels, in groups of 32 inputs with a scale and a minimum each, on our
    own kernel (the hidden states rounded to int8 in groups of 32 of each row, so that a row's
    scores do not depend on the rows beside it). Gives fp32."""

    def __init__(self, packed: torch.Tensor) -> None:
        super().__init__(packed.nbytes)
        self.weight = packed

    def forward(self, x: torch.Tensor, use_dense: bool = True) -> torch.Tensor:
        return torch.ops.chat.int8_linear(x, self.weight)


class FbgemmInt8Head(Matrix):
    """The head in int8 with one scale per output row, on FBGEMM's dynamic int8 kernel: it
    quantizes the hidden states on the fly (one scale per call) and reads the weights two to
    three times as fast as `_weight_int8pack_mm`, which reads them again for every four rows.
    Gives fp32."""

    def __init__(self, packed, weight_bytes: int) -> None:
        super().__init__(weight_bytes)
        self.packed = packed

    def forward(self, x: torch.Tensor, use_dense: bool = True) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)


# The bf16 copies


# oneDNN keeps what it builds for a bf16 product of each input size, for good (docs/memory.md): the
# products' rows are rounded up (padded_rows) from 16 rows on, to a multiple of 8, or of an eighth
# of their octave if larger (at most 7 rows, or under 12.5%): ~35 sizes up to a prompt pass's 768.
def padded_rows(rows: int) -> int:
    """`rows` rounded up to the next of the few sizes the bf16 products are taken in."""
    if rows < 16:
        return rows
    step = 8
    while step * 16 <= rows:
        step *= 2
    return (rows + step - 1) // step * step


def _dense_product(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x @ dense.T, in rows rounded up by padded_rows."""
    rows = x.size(0)
    padded = padded_rows(rows)
    if padded != rows:
        x = F.pad(x, [0, 0, 0, padded - rows])
    if dense.is_mkldnn:  # packed by oneDNN (_dense_copy)
        no_post_op: list[int | float | complex | None] = []  # ("Scalar?[]")
        product = torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", no_post_op, "")
    else:
        product = F.linear(x, dense)
    return product[:rows]


def _dense_copy(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 copy for inputs of many rows, packed by oneDNN into the blocked layout its
    matrix kernels read, where torch has oneDNN: F.linear on a plain bf16 matrix reorders it on
    every call (the same results to the bit)."""
    dense = weight.to(torch.bfloat16)
    if torch.backends.mkldnn.is_available():
        try:
            return torch.ops.mkldnn._reorder_linear_weight(dense, None)
        except Exception:
            logger.info("No oneDNN packing here: prompts multiply plain bf16", exc_info=True)
    return dense


# Quantizing


def _in_groups(
    weight: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` (outputs, inputs) in groups of `group` inputs, each spanned by 2^bits levels
    from its smallest weight to its largest: (levels (outputs, inputs), scale and minimum
    (outputs, groups)), w ~= level * scale + minimum."""
    rows, columns = weight.shape
    groups = weight.view(rows, columns // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    top = 2**bits - 1
    scale = ((high - low) / top).clamp(min=1e-8)
    # (In place: one copy of the matrix at a time; the head's is 113 MB in fp32.)
    levels = (groups - low[..., None]).div_(scale[..., None]).round_().clamp_(0, top)
    return levels.view(rows, columns), scale, low


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row): symmetric, the row's largest magnitude at 127."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor):
    """FBGEMM's packed form of an int8 matrix with one scale per row (for
    `quantized.linear_dynamic`), or None if this torch or CPU cannot multiply with it. (torch
    marks its quantized tensors deprecated; it is pinned.)"""
    try:
        with warnings.catch_warnings(action="ignore", category=UserWarning):
            quantized = torch._make_per_channel_quantized_tensor(
                weight, scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(quantized, None)
            torch.ops.quantized.linear_dynamic(torch.zeros(1, weight.shape[1]), packed, False)
        return packed
    except Exception:
        logger.info("No FBGEMM int8 kernel here; int8 products use _weight_int8pack_mm")
        return None


# Smoothing


def _int8_copy(weight: torch.Tensor, peaks: torch.Tensor | None):
    """(FBGEMM's int8 copy of `weight`, smoothed with the `peaks` of its input channels if
    given; the smoothing or None), or (None, None) where FBGEMM is missing."""
    smoothing = None if peaks is None else calibration.smoothing_factors(peaks, weight)
    batch = _fbgemm_pack(*_int8_rows(weight if smoothing is None else weight * smoothing))
    return (batch, smoothing) if batch is not None else (None, None)
