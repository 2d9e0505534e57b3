"""A lean decoder for Llama-architecture models (SmolLM2 is one): the forward pass of a loaded
transformers model, rewritten for serving many conversations on a CPU.

What it does differently from `model.generate`:
- Weights are read as few bytes as the chosen format allows (weights.py): "int4" (the default)
  keeps the layers' linear weights as int4 in groups of 32 and the output head as int8; "int8"
  keeps all of them as int8 with one scale per output row. "bf16" and "fp32" keep plain
  weights. The residual stream and the norms stay in fp32 in every format.
- The keys and values live in preallocated slot rows (kv_cache.py), one per conversation being
  answered, so a decode step appends in place instead of concatenating.
- One decode step runs every row at once: the weights are read once for all of them.
- The query, key and value projections are one matrix, and so are the gate and up projections.
- The layers run as one TorchScript module (layers.py).

Rotary position embeddings come from the model's own module, so its rope scaling applies.
Models that do not fit this shape (biases, other activations, sliding windows, encoder-decoder)
are served by `generate` instead; `supports()` says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import layers, native, weights
from .calibration import input_peaks
from .kv_cache import SlotCache

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
        kernel_set: str = "true",
    ):
        """With `release`, each layer's own linear weights are dropped from `model` once the
        decoder holds them in its format (the model can no longer run its forward pass): the
        memory peaks at one layer's worth of copies, and hundreds of MB are given back.
        `calibration`: token ids (calibration.CALIBRATION, encoded) the model reads first, to
        smooth the int8 copies of batched steps (int4 on torch's kernels only); without, they
        are not smoothed.
        `kernels`: where our own kernels are built and kept (native.py), for the bf16 formats
        (quantized products and decode-step attention); None: torch's kernels only.
        `kernel_set`: which instruction set's (native.choose: `true` for the best the CPU has).
        `slot_bytes`: the most the slot rows' keys and values may take (SlotCache.max_bytes;
        0: no limit)."""
        if fmt not in weights.WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {', '.join(weights.WEIGHT_FORMATS)}")
        config = model.config
        self.fmt = fmt
        self.dtype = weights.activation_type(fmt)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        self._cos = self._sin = torch.empty(0)
        # Our own kernels, where they can be built (quantized products, decode-step attention).
        self.native = (
            kernels is not None
            and self.dtype == torch.bfloat16
            and native.load(kernels, kernel_set)
        )
        peaks = [None] * len(model.model.layers)
        if calibration and fmt == "int4" and not self.native:
            peaks = input_peaks(model, calibration)
        self.layers: list[layers.Layer] = []
        for layer, layer_peaks in zip(model.model.layers, peaks, strict=True):
            self.layers.append(self._layer(layer, layer_peaks))
            if release:
                _release_linear_weights(layer)
        self.embed = model.model.embed_tokens.weight.detach().float()
        self.final_norm = layers.Norm(
            model.model.norm.weight.detach().float(), self.eps, self.dtype
        )
        self.head = weights.head(model.lm_head.weight, fmt, native_int8=self.native)
        self.cache = SlotCache(
            len(self.layers), self.kv_heads, self.head_dim, self.dtype, limit, slot_bytes
        )
        # Decode steps attend with our own kernel where it takes this model and could be built.
        self.native_attention = self.native and native.attention_fits(
            self.dtype, self.heads, self.kv_heads, self.head_dim
        )
        # So do a follow-up's few new tokens over the history.
        self.native_prefill = self.native_attention
        self._stack = layers.script(self._layer_stack())
        self._warm_up()

    def _layer(self, layer: Any, peaks: tuple | None) -> layers.Layer:
        qkv, out, gate_up, down = weights.layer_matrices(
            layer, self.fmt, peaks, native_int4=self.native
        )
        norms = (
            layers.Norm(
                layer.input_layernorm.weight.detach().float(), self.eps, self.dtype, qkv.smoothing
            ),
            layers.Norm(
                layer.post_attention_layernorm.weight.detach().float(),
                self.eps,
                self.dtype,
                gate_up.smoothing,
            ),
        )
        return layers.Layer(
            qkv,
            out,
            gate_up,
            down,
            norms,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
        )

    def _layer_stack(self) -> layers.Layers:
        """The layers as a module (plain Python until scripted)."""
        return layers.Layers(self.layers)

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
        return self.head.weight_bytes + sum(
            matrix.weight_bytes
            for layer in self.layers
            for matrix in (layer.qkv, layer.out, layer.gate_up, layer.down)
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
            slots=slots,
            length=length,
            mask=mask,
            runs=[],
            rows=None,
            lengths=lengths,
            native_run=False,
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
        # Short runs (follow-up messages): our kernel, a run at a time, which needs no mask.
        native_run = self.native_prefill and group * longest <= native.PREFILL_QUERIES
        if len(runs) > 1 and not native_run:  # all runs in one call (see layers.Attention)
            rows = torch.tensor([row for row, _, _ in runs])
            length = max(start + len(tokens) for _, tokens, start in runs)
            allowed = torch.arange(length).view(1, 1, -1) <= positions.unsqueeze(2)
            mask = self._mask(allowed).repeat(1, group, 1).unsqueeze(1)
        elif not native_run:  # one run: causal from position 0 (or one token), else masked
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
            native_run=native_run,
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
        return self.head(self.final_norm(x), dense).float()

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
