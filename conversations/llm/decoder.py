"""A lean decoder for Llama-architecture models (SmolLM2 is one): the forward pass of a loaded
transformers model, rewritten for serving many conversations on a CPU.

What it does differently from `model.generate`:
- Weights are read as few bytes as the chosen format allows: "int4" (the default) keeps the
  layers' linear weights as int4 in groups of 32 and the output head as int8; "int8" keeps all of
  them as int8 with one scale per output row. "bf16" and "fp32" keep plain weights. The residual
  stream and the norms stay in fp32 in every format.
- int4 layers and the int8 head multiply with kernels of our own where the CPU has AVX-512
  VNNI (quantized_linear.cpp, built by native.py): the inputs rounded to int8 in groups of 32,
  integer dot products straight from the levels, the weights read once for up to eight rows.
  Elsewhere torch's weight-only kernels (`aten._weight_int4pack_mm_for_cpu`,
  `aten._weight_int8pack_mm`) multiply on bf16 inputs, the head with FBGEMM, and from five rows
  on each layer's query-key-value and gate-up matrices multiply as int8 x int8 with FBGEMM,
  their inputs smoothed per channel (see BATCH_INT8_ROWS and CALIBRATION).
- The keys and values live in preallocated slot tensors, one row per conversation being
  answered, so a decode step appends in place instead of concatenating.
- One decode step runs every row at once: the weights are read once for all of them.
- The query, key and value projections are one matrix, and so are the gate and up projections.

Rotary position embeddings come from the model's own module, so its rope scaling applies.
Models that do not fit this shape (biases, other activations, sliding windows, encoder-decoder)
are served by `generate` instead; `supports()` says which.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import layers, native
from .kv_cache import SlotCache

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int4", "int8", "bf16", "fp32")
INT4_GROUP = 32
# From this many rows of input (prompt tokens, or replies in one step) on, a quantized layer
# matrix multiplies with its bf16 copy: the quantized kernels read the weights once for every
# four rows, right for decoding a few rows, 3x slower than bf16 for a prompt.
DENSE_ROWS = 16
# Without FBGEMM, the output head multiplies with a bf16 copy from this many rows on (_Head).
HEAD_DENSE_ROWS = 5
# On torch's kernels (our own int4 product takes every size below DENSE_ROWS): from this many
# rows on (below DENSE_ROWS: a decode step of five or more replies, a short prompt), the gate-up
# and query-key-value matrices multiply as int8 x int8 with FBGEMM's
# dynamic kernel, the fp32 input quantized in the same call (layers.BatchedLinear): the int4
# kernel's cost doubles from four rows to eight (gate-up alone, eight rows: 200 -> 55 us). An
# eight-reply step took 4-6% less with the gate-up product so than with oneDNN's int8 product
# and the per-row quantization written around it, and 2% less again with query-key-value too.
# Out and down stay int4: their inputs are not a norm's output, and even smoothed, int8 inputs
# to down cost 1-4% perplexity.
BATCH_INT8_ROWS = 5
# What the int8 products' smoothing is measured on (see _input_peaks): a short chat of mixed
# prose, numbers and code, read once by the model at load (~170 tokens, ~0.4 s). Measured over
# 2,900 tokens of five other texts, read eight tokens a pass, perplexity against fp32's went
# 1.0157 -> 1.0130 (the gate-up product smoothed, and query-key-value added); unsmoothed,
# query-key-value int8 made it 1.0376.
CALIBRATION = [
    {"role": "user", "content": "How is bread made, and how far is 5 km in miles?"},
    {
        "role": "assistant",
        "content": (
            "Flour, water and salt are mixed into a dough and kneaded until it is smooth. Yeast "
            "or a sourdough starter makes it rise: it turns sugars into gas, which the gluten "
            "traps. The loaf is shaped, rests again and bakes in a hot oven until the crust "
            "browns. Five kilometres is about 3.1 miles (multiply by 0.621).\n\n"
            "```python\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
            "        a, b = b, a + b\n    return a\n```"
        ),
    },
]
# SmoothQuant's migration strength: s_j = peak_j ** alpha / max|W[:, j]| ** (1 - alpha).
SMOOTHING_ALPHA = 0.5
# score() reads its tokens in passes of this many, each computed as a decode step of as many
# replies (the server's default batch) computes it.
STEP_ROWS = 8


def supports(model: Any) -> bool:
    """Whether this decoder can run `model` (a transformers causal LM)."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "llama"
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and hasattr(getattr(model, "model", None), "rotary_emb")
    )


class _Linear:
    """y = x @ W.T, with W stored as "int4", "int8", "bf16" or "fp32".

    int8: one scale per output row, symmetric. int4: groups of INT4_GROUP weights along the
    input, each with its own scale and minimum, packed for torch's CPU kernel (the layout
    torchao's int4 weight-only quantization uses), or with `native_int4` for our own (format
    "int4-vnni", native.pack). A matrix whose input size is not a multiple of the group is kept
    as int8.

    Those kernels read the weights once for every four rows of input: right for decoding (a few
    rows), slow for a prompt (hundreds of rows, where a bf16 matrix product is 3x faster). With
    `dense_from`, a quantized matrix also keeps a bf16 copy for inputs of that many rows or more.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        fmt: str,
        *,
        dense_from: int = 0,
        batch_int8: bool = False,
        peaks: torch.Tensor | None = None,
        native_int4: bool = False,
    ) -> None:
        weight = weight.detach().float()
        self.dense = _dense_copy(weight) if dense_from and fmt in ("int4", "int8") else None
        self.dense_from = dense_from
        if fmt == "int4" and weight.shape[1] % INT4_GROUP:
            fmt = "int8"
        if fmt == "int4":
            levels, scale, low = _in_groups(weight, 4, INT4_GROUP)
            # With `native_int4`, our own kernel multiplies it at every size below dense_from.
            if native_int4 and native.quantized_fits(weight.shape, scale, low):
                fmt = "int4-vnni"
        self.fmt = fmt
        # With `batch_int8`, an int4 matrix for torch's kernel also keeps an int8 copy packed
        # for FBGEMM, for BATCH_INT8_ROWS rows or more (layers.BatchedLinear); None where FBGEMM
        # is missing. With the `peaks` of its input channels, that copy is smoothed: its column
        # j scaled by `smoothing[j]`, by which the input is then divided.
        self.batch = self.smoothing = None
        if batch_int8 and fmt == "int4":
            smoothing = None if peaks is None else _smoothing(peaks, weight)
            scaled = weight if smoothing is None else weight * smoothing
            self.batch = _fbgemm_pack(*_int8_rows(scaled))
            self.smoothing = smoothing if self.batch is not None else None
        if fmt == "int4-vnni":
            self.weight = native.pack(levels, scale, low, bits=4)
            self.scale = None
        elif fmt == "int4":
            # The kernel reads w = (level - 8) * scale + zero, so zero = low + 8 * scale.
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                levels.to(torch.int32), 1
            )
            zero = low + 8 * scale
            self.scale = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16)
        elif fmt == "int8":
            self.weight, scale = _int8_rows(weight)
            self.scale = scale.to(torch.bfloat16)
        else:
            self.weight = weight.to(torch.bfloat16 if fmt == "bf16" else torch.float32)
            self.scale = None

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """(weight, scale, bf16 copy, format), as layers.multiply takes them (an empty tensor
        for a part the format does not have)."""
        none = torch.empty(0)
        scale = none if self.scale is None else self.scale
        return self.weight, scale, none if self.dense is None else self.dense, self.fmt

    def __call__(self, x: torch.Tensor, *, dense: bool = True) -> torch.Tensor:
        return layers.multiply(x, *self.parts, self.dense_from if dense else 0)


def _dense_copy(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 copy for inputs of many rows, packed by oneDNN into the blocked layout its
    matrix kernels read, where torch has oneDNN: F.linear on a plain bf16 matrix reorders it
    on every call (a prompt's products: 25-40% slower; the same results to the bit)."""
    dense = weight.to(torch.bfloat16)
    if torch.backends.mkldnn.is_available():
        try:
            return torch.ops.mkldnn._reorder_linear_weight(dense, None)
        except Exception:
            logger.info("No oneDNN packing here: prompts multiply plain bf16", exc_info=True)
    return dense


def _smoothing(peaks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's factor per input channel of `weight`, from the largest magnitude each
    channel of its input took (`peaks`): the input's range and the weights' meet halfway."""
    reach = weight.abs().amax(dim=0).clamp(min=1e-5)
    return peaks.clamp(min=1e-5) ** SMOOTHING_ALPHA / reach ** (1 - SMOOTHING_ALPHA)


def _input_peaks(model: Any, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The largest magnitude each input channel of every layer's query-key-value and gate-up
    products takes while `model` (its own forward pass) reads `ids`: [(attention's, MLP's)]."""
    peaks: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for module in (layer.self_attn.q_proj, layer.mlp.gate_proj):

            def keep(_, inputs, index=index):
                peaks[index].append(inputs[0].detach().float().abs().flatten(0, -2).amax(dim=0))

            hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return [(attention, mlp) for attention, mlp in peaks]


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row): symmetric, the row's largest magnitude at 127."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class _Head:
    """The output head, int8. With `native`, in groups of 32 inputs with a scale and a minimum
    each, multiplied by our own kernel (native.pack, quantized_linear.cpp: the hidden states
    rounded to int8 in groups of 32 of each row, so that a row's scores do not depend on the
    rows beside it). Otherwise with one scale per output row (as _Linear), multiplied by
    FBGEMM's dynamic int8 kernel where torch has it: the hidden states are quantized to int8 on
    the fly (one scale per call) and the product reads the int8 weights two to three times as
    fast as `_weight_int8pack_mm`, which reads them again for every four rows (one row: 2.3 ->
    1.0 ms, eight: 6.0 -> 2.1 ms; perplexity 0.997 of fp32 against 1.000). Without FBGEMM,
    inputs of HEAD_DENSE_ROWS rows or more multiply with a bf16 copy instead."""

    def __init__(self, weight: torch.Tensor, *, native_int8: bool = False) -> None:
        weight = weight.detach().float()
        self.native = self.packed = self.linear = None
        if native_int8:
            self.native = _native_int8(weight)
        if self.native is not None:
            self.weight_bytes = self.native.nbytes
            return
        quantized, scale = _int8_rows(weight)
        self.weight_bytes = quantized.nbytes
        # (The scale as _Linear keeps it, in bf16.) FBGEMM holds its own copy of the weights.
        self.packed = _fbgemm_pack(quantized, scale.to(torch.bfloat16))
        if self.packed is None:
            self.linear = _Linear(weight, "int8", dense_from=HEAD_DENSE_ROWS)

    def __call__(self, x: torch.Tensor, *, dense: bool = True) -> torch.Tensor:
        if self.native is not None:
            return torch.ops.chat.int8_linear(x, self.native)
        if self.linear is not None:
            return self.linear(x, dense=dense)
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)


def _native_int8(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in 8-bit levels, groups of 32 inputs with a scale and minimum each, packed for
    chat::int8_linear; None if it does not take it."""
    if weight.shape[1] % native.GROUP:
        return None
    levels, scale, low = _in_groups(weight, 8, native.GROUP)
    if not native.quantized_fits(weight.shape, scale, low):
        return None
    return native.pack(levels, scale, low, bits=8)


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
        logger.info("No FBGEMM int8 kernel here; the output head uses _weight_int8pack_mm")
        return None


class _Layer:
    def __init__(
        self, layer: Any, fmt: str, peaks: tuple | None = None, *, native_int4: bool = False
    ) -> None:
        """`peaks`: the input peaks of its query-key-value and gate-up products (see
        _input_peaks), to smooth their int8 copies; None: not smoothed."""
        attention, mlp = layer.self_attn, layer.mlp
        attention_peaks, mlp_peaks = peaks or (None, None)
        self.input_norm = layer.input_layernorm.weight.detach().float()
        self.post_attention_norm = layer.post_attention_layernorm.weight.detach().float()
        self.qkv = _Linear(
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
            fmt,
            dense_from=DENSE_ROWS,
            native_int4=native_int4,
            # Unsmoothed, int8 inputs here cost 2% perplexity: only with the peaks.
            batch_int8=attention_peaks is not None,
            peaks=attention_peaks,
        )
        self.out = _Linear(
            attention.o_proj.weight, fmt, dense_from=DENSE_ROWS, native_int4=native_int4
        )
        self.gate_up = _Linear(
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            fmt,
            dense_from=DENSE_ROWS,
            native_int4=native_int4,
            batch_int8=True,
            peaks=mlp_peaks,
        )
        self.down = _Linear(
            mlp.down_proj.weight, fmt, dense_from=DENSE_ROWS, native_int4=native_int4
        )


class LlamaDecoder:
    """The forward pass over slot rows: `prefill` feeds one row a run of prompt tokens,
    `prefill_many` several rows one each, `decode` rows 0..n-1 one token each; all three return
    next-token logits (fp32). `score` feeds a row a text and returns the logits after each of
    its tokens, computed as batched decode steps compute them."""

    def __init__(
        self,
        model: Any,
        *,
        fmt: str = "int4",
        limit: int = 2048,
        slot_bytes: int = 0,
        release: bool = False,
        calibration: list[int] | None = None,
        kernels: Path | str | None = None,
    ):
        """With `release`, each layer's own linear weights are dropped from `model` once the
        decoder holds them in its format (the model can no longer run its forward pass): the
        memory peaks at one layer's worth of copies, and hundreds of MB are given back.
        `calibration`: token ids (CALIBRATION, encoded) the model reads first, to smooth the
        int8 copies of batched steps (int4 on torch's kernels only); without, they are not
        smoothed.
        `kernels`: where our own kernels are built and kept (native.py), for the bf16 formats
        (quantized products and decode-step attention); None: torch's kernels only.
        `slot_bytes`: the most the slot rows' keys and values may take (SlotCache.max_bytes;
        0: no limit)."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}")
        config = model.config
        self.fmt = fmt
        self.dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        self._cos = self._sin = torch.empty(0)
        # Our own kernels, where they can be built (quantized products, decode-step attention).
        self.native = kernels is not None and self.dtype == torch.bfloat16 and native.load(kernels)
        peaks = [None] * len(model.model.layers)
        if calibration and fmt == "int4" and not self.native:
            peaks = _input_peaks(model, calibration)
        self.layers = []
        for layer, layer_peaks in zip(model.model.layers, peaks, strict=True):
            self.layers.append(_Layer(layer, fmt, layer_peaks, native_int4=self.native))
            if release:
                _release_linear_weights(layer)
        self.embed = model.model.embed_tokens.weight.detach().float()
        self.final_norm = layers.Norm(
            model.model.norm.weight.detach().float(), self.eps, self.dtype
        )
        # The output head turns each hidden state into 49k scores: int4 there costs measurably
        # more perplexity than in the layers, so it stays int8 (the GGUF's head is 8-bit too).
        if fmt in ("int4", "int8"):
            self.head = _Head(model.lm_head.weight, native_int8=self.native)
        else:
            self.head = _Linear(model.lm_head.weight, fmt)
        self.cache = SlotCache(
            len(self.layers), self.kv_heads, self.head_dim, self.dtype, limit, slot_bytes
        )
        # Decode steps attend with our own kernel where it takes this model and could be built.
        self.native_attention = self.native and native.attention_fits(
            self.dtype, self.heads, self.kv_heads, self.head_dim
        )
        self._stack = layers.script(self._layer_stack())
        self._warm_up()

    def _layer_stack(self) -> layers.Layers:
        """The layers as a module (plain Python until scripted)."""
        return layers.Layers(
            [
                layers.Layer(
                    *(
                        self._matrix(linear)
                        for linear in (layer.qkv, layer.out, layer.gate_up, layer.down)
                    ),
                    (
                        layers.Norm(layer.input_norm, self.eps, self.dtype, layer.qkv.smoothing),
                        layers.Norm(
                            layer.post_attention_norm, self.eps, self.dtype, layer.gate_up.smoothing
                        ),
                    ),
                    heads=self.heads,
                    kv_heads=self.kv_heads,
                    head_dim=self.head_dim,
                )
                for layer in self.layers
            ]
        )

    def _matrix(self, linear: _Linear) -> torch.nn.Module:
        matrix = layers.Linear(*linear.parts, linear.dense_from, dtype=self.dtype)
        if linear.batch is None:
            return matrix
        return layers.BatchedLinear(matrix, linear.batch, BATCH_INT8_ROWS)

    def _warm_up(self) -> None:
        """TorchScript profiles the first two runs of the layers, then optimizes them (~0.7 s
        for SmolLM2): done here, at load, rather than in someone's first reply."""
        with torch.inference_mode():
            for _ in range(2):
                self.prefill(0, [0, 0], 0)
            self.decode([0], [2])
        self.cache.clear()

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (the matrices, as the decode kernels read
        them: without the bf16 copies that prompts use)."""
        head = getattr(self.head, "weight_bytes", None) or self.head.weight.nbytes
        return head + sum(
            linear.weight.nbytes
            for layer in self.layers
            for linear in (layer.qkv, layer.out, layer.gate_up, layer.down)
        )

    # The calls

    def prefill(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        """Feed `tokens` to slot `row`, whose first `start` positions already hold the
        conversation's earlier tokens. Returns the logits after the last token: (vocab,)."""
        return self.prefill_many([(row, tokens, start)])[0]

    def prefill_many(self, runs: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Feed several rows a run of tokens each, (row, tokens, start) as in `prefill`, in one
        pass: the matrix products take all runs at once. Returns the logits after each run's
        last token: (len(runs), vocab)."""
        ids, positions, attention = self._runs(runs)
        x = self._hidden(ids, positions, attention, dense=True)
        batch, count = ids.shape
        if count > 1:
            last = torch.tensor([len(tokens) - 1 for _, tokens, _ in runs])
            x = x.view(batch, count, -1)[torch.arange(batch), last]
        return self._logits(x, dense=True)

    def score(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        """Feed `tokens` to slot `row` as `prefill` does, and return the logits after each
        token: (len(tokens), vocab). They are read STEP_ROWS tokens a pass, each computed as a
        decode step of as many replies computes it (the quantized products, no bf16 copies), so
        that they measure what batched replies are written with."""
        passes = []
        for i in range(0, len(tokens), STEP_ROWS):
            ids, positions, attention = self._runs([(row, tokens[i : i + STEP_ROWS], start + i)])
            hidden = self._hidden(ids, positions, attention, dense=False)
            passes.append(self._logits(hidden, dense=False))
        return torch.cat(passes)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed token i at position i to slot row i, for every i at once. Returns (n, vocab)."""
        n = len(tokens)
        where = torch.tensor(positions, dtype=torch.long)
        length = max(positions) + 1
        self.cache.reserve(n, length)
        # Row i sees its own positions only: 0..positions[i] (our kernel takes their count).
        mask, lengths = None, None
        if self.native_attention:
            lengths = where + 1
        elif min(positions) != length - 1:
            mask = self._mask(torch.arange(length).unsqueeze(0) <= where.unsqueeze(1))[
                :, None, None, :
            ]
        # Where each row's new key and value go, head by head, in a layer's flat view of
        # (rows * heads * positions) vectors: row i's head h at (i * heads + h) * positions +
        # positions[i].
        row_heads = torch.arange(n * self.kv_heads).view(n, self.kv_heads)
        slots = (row_heads * self.cache.positions + where.unsqueeze(1)).view(-1)
        attention = layers.Attention(
            slots=slots, length=length, mask=mask, runs=[], rows=None, lengths=lengths
        )
        ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        hidden = self._hidden(ids, where.unsqueeze(1), attention, dense=True)
        return self._logits(hidden, dense=True)

    # The layers

    def _runs(self, runs: list[tuple[int, list[int], int]]):
        """(ids, positions, attention) of a pass reading `runs`, (row, tokens, start) each, with
        room made for them in the slot rows."""
        longest = max(len(tokens) for _, tokens, _ in runs)
        self.cache.reserve(max(row for row, _, _ in runs) + 1, max(s + len(t) for _, t, s in runs))
        # Shorter runs are padded at the end; their padding is computed and thrown away.
        ids = torch.zeros(len(runs), longest, dtype=torch.long)
        positions = torch.zeros(len(runs), longest, dtype=torch.long)
        for i, (_, tokens, start) in enumerate(runs):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            positions[i] = torch.arange(start, start + longest)
        # Token j of a run sees the row's earlier positions and the run up to j; once per
        # query head of a key-value head's group (attention reads them as one run).
        group = self.heads // self.kv_heads
        mask, rows, length = None, None, 0
        if len(runs) > 1:  # all runs in one call (see layers.Attention)
            rows = torch.tensor([row for row, _, _ in runs])
            length = max(start + len(tokens) for _, tokens, start in runs)
            allowed = torch.arange(length).view(1, 1, -1) <= positions.unsqueeze(2)
            mask = self._mask(allowed).repeat(1, group, 1).unsqueeze(1)
        else:  # one run: causal from position 0 (or one token), else masked
            ((_, tokens, start),) = runs
            if start > 0 and len(tokens) > 1:
                end = start + len(tokens)
                allowed = torch.arange(end).unsqueeze(0) <= positions[0].unsqueeze(1)
                mask = self._mask(allowed).repeat(group, 1)
        attention = layers.Attention(
            slots=None,
            length=length,
            mask=mask,
            runs=[(row, start, len(tokens)) for row, tokens, start in runs],
            rows=rows,
            lengths=None,
        )
        return ids, positions, attention

    def _hidden(self, ids, positions, attention, *, dense: bool) -> torch.Tensor:
        """The last layer's output (tokens, hidden) for `ids` (batch, count) at `positions`;
        `attention` says how the layers attend (see layers.Attention), `dense` whether the
        quantized matrices may multiply many rows with their bf16 copies."""
        x = F.embedding(ids.view(-1), self.embed)  # fp32 residual stream, (tokens, hidden)
        cos, sin = self._rope(positions.view(-1))  # (tokens, 1, head size)
        return self._stack(x, cos, sin, self.cache.keys, self.cache.values, dense, attention)

    def _logits(self, x: torch.Tensor, *, dense: bool) -> torch.Tensor:
        """The next-token logits (rows, vocab), fp32, after the hidden states `x`."""
        return self.head(self.final_norm(x), dense=dense).float()

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """An attention mask to add to the scores (0 where allowed, -inf elsewhere): given as
        booleans, attention converts the mask in every layer."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        return mask.masked_fill_(~allowed, float("-inf"))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cos and sin at these positions, from a table computed once
        (and extended if a position lies past it) by the model's own rotary module."""
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0]:
            everywhere = torch.arange(max(needed, 2 * self._cos.shape[0])).unsqueeze(0)
            cos, sin = self.rotary(self.embed[:1], everywhere)
            half = self.head_dim // 2
            self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
            self._sin[:, :half] *= -1
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)


def _release_linear_weights(layer: Any) -> None:
    for module in (layer.self_attn, layer.mlp):
        for child in module.children():
            if isinstance(child, torch.nn.Linear):
                child.weight.data = torch.empty(0, dtype=child.weight.dtype)
