"""The kernels of our own (conversations/llm/native.py, decode_attention.cpp,
quantized_linear.cpp):
built once into the model cache, they compute what torch computes for the shapes and layouts the
decoder hands them, a decode step of the real model writes the same tokens with them as without,
and where they cannot be built the decoder uses torch's kernels."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from django.conf import settings

from benchmarks.quality import SCORED_TEXT
from conversations.llm import native, weights
from conversations.llm.engine import GenerationParams
from conversations.llm.kv_cache import SlotCache
from tests.conftest import KERNEL_SETTING, KERNELS_RUN_HERE
from tests.processes import run_python

ROOT = Path(__file__).resolve().parent.parent
# The kernels are built for AVX-512, for AVX2 with AVX-VNNI and for AVX2: they run wherever one
# of those does. They are tested again in `make test`'s pass with torch limited to AVX2 (marked
# `engine`, as the real model's tests are), where the AVX2 ones are loaded, and in one with
# CHATBOT_NATIVE_KERNELS=avx2-vnni, so an AVX-512 machine tests all three.
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason=f"CHATBOT_NATIVE_KERNELS={KERNEL_SETTING}: none of ours run here (or torch is "
    "limited to less)",
)


@pytest.fixture(scope="module")
def kernel():
    assert native.load(settings.CHATBOT_MODEL_CACHE, KERNEL_SETTING)
    return torch.ops.chat.decode_attention


def slot_rows(rows, kv_heads, head_dim, positions=300):
    """Keys and values in random rows of a SlotCache, the views the layers hand the kernel."""
    cache = SlotCache(
        layers=2,
        heads=kv_heads,
        head_dim=head_dim,
        dtype=torch.bfloat16,
        limit=max(2048, positions),
    )
    cache.reserve(rows + 1, positions)
    cache.data.normal_()
    return cache.keys[1], cache.values[1]


def reference(q, keys, values, lengths, dtype=torch.float32):
    """torch's attention, one row at a time over its own positions, in `dtype`."""
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[row : row + 1].to(dtype).unsqueeze(2),
                keys[row : row + 1, :, :length].to(dtype),
                values[row : row + 1, :, :length].to(dtype),
                enable_gqa=True,
            ).view(1, -1)
            for row, length in enumerate(lengths.tolist())
        ]
    )


def assert_like_torch_attention(out, q, keys, values, lengths):
    """`out` is attention computed in fp32 but for rounding, and as close to it as torch's own
    bf16 attention (what the kernel replaces) is."""
    expected = reference(q, keys, values, lengths)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch_bf16 = reference(q, keys, values, lengths, torch.bfloat16)
    ours = (out.float() - expected).abs().max()
    theirs = (torch_bf16.float() - expected).abs().max()
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 64), (8, 4, 64), (16, 4, 128), (6, 2, 128)],
)
def test_the_kernel_computes_what_torch_attention_computes(kernel, heads, kv_heads, head_dim):
    """Rows of different lengths (one position, odd, a multiple of 16 and one past it, long),
    queries split out of a wider tensor as the layers do, sharp and flat scores."""
    lengths = torch.tensor([1, 2, 16, 17, 31, 255, 300])
    keys, values = slot_rows(len(lengths), kv_heads, head_dim)
    for sharpness in (1.0, 8.0):
        wide = torch.randn(len(lengths), heads + 2 * kv_heads, head_dim) * sharpness
        q = wide.to(torch.bfloat16)[:, :heads]
        out = kernel(q, keys, values, lengths)
        assert out.shape == (len(lengths), heads * head_dim) and out.dtype == torch.bfloat16
        assert_like_torch_attention(out, q, keys, values, lengths)
        # A row of one position is its value, exactly (bf16 in, bf16 out).
        group = heads // kv_heads
        first = out[0].view(heads, head_dim)
        for head in range(heads):
            assert torch.equal(first[head], values[0, head // group, 0])


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize("length", [1, 100, 257, 300, 2000])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 1)])
def test_one_rows_positions_are_cut_into_runs_that_compute_the_same(
    kernel, length, heads, kv_heads
):
    """One reply (fewer row and head pairs than twice the threads): its positions are cut into
    runs of at least 256, attended to apart and combined, and the result is what torch's
    attention computes, as for a whole row."""
    keys, values = slot_rows(2, kv_heads, 64, positions=2048)
    lengths = torch.tensor([length])
    for sharpness in (1.0, 8.0):
        q = (torch.randn(1, heads, 64) * sharpness).to(torch.bfloat16)
        assert_like_torch_attention(kernel(q, keys, values, lengths), q, keys, values, lengths)


@needs_kernels
@pytest.mark.engine
def test_the_kernel_refuses_what_it_cannot_compute_with_a_clear_error(kernel):
    keys, values = slot_rows(2, 3, 64)
    q = torch.randn(2, 9, 64).to(torch.bfloat16)
    lengths = torch.tensor([5, 7])
    cases = [
        ((q.float(), keys, values, lengths), "bf16 only"),
        ((q, keys, values, torch.tensor([0, 7])), "length out of range"),
        ((q, keys, values, torch.tensor([5, keys.size(2) + 1])), "length out of range"),
        ((q, keys, values, torch.tensor([5])), "one int64 length per row"),
        ((torch.randn(2, 15, 64).to(torch.bfloat16), keys, values, lengths), "1-4 heads a group"),
        ((torch.randn(2, 9, 32).to(torch.bfloat16), keys, values, lengths), "shapes do not match"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=message):
            kernel(*arguments)


def prefill_reference(q, keys, values, row, start, dtype=torch.float32):
    """torch's attention of the tokens q (tokens, heads, D) at start.. over row `row`, token t
    seeing positions 0..start + t, in `dtype`: (tokens, heads * D)."""
    count, end = q.size(0), start + q.size(0)
    allowed = torch.arange(end).unsqueeze(0) <= (start + torch.arange(count)).unsqueeze(1)
    attended = F.scaled_dot_product_attention(
        q.to(dtype).transpose(0, 1).unsqueeze(0),
        keys[row : row + 1, :, :end].to(dtype),
        values[row : row + 1, :, :end].to(dtype),
        attn_mask=allowed,
        enable_gqa=True,
    )
    return attended[0].transpose(0, 1).reshape(count, -1)


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 64), (16, 4, 128), (4, 1, 64)]
)
@pytest.mark.parametrize(
    ("tokens", "start"),
    # A first token; a prompt from position 0; a follow-up over a short history, over one of
    # several runs of 512 positions, and up to 128 queries to a key-value head.
    [(1, 0), (1, 700), (5, 0), (25, 130), (21, 1500), (32, 600), (40, 3000)],
)
def test_the_prefill_kernel_computes_what_torch_attention_computes(
    kernel, heads, kv_heads, head_dim, tokens, start
):
    """New tokens over a slot row's history: each sees the positions up to its own, as close to
    attention in fp32 as torch's own bf16 attention is, with sharp and flat scores."""
    group = heads // kv_heads
    tokens = min(tokens, native.PREFILL_QUERIES // group)  # (the most it takes)
    keys, values = slot_rows(3, kv_heads, head_dim, positions=start + tokens)
    for sharpness in (1.0, 8.0):
        wide = torch.randn(tokens, heads + 2 * kv_heads, head_dim) * sharpness
        q = wide.to(torch.bfloat16)[:, :heads]  # (split out of a wider tensor, as the layers do)
        out = torch.ops.chat.prefill_attention(q, keys, values, 2, start)
        assert out.shape == (tokens, heads * head_dim) and out.dtype == torch.bfloat16
        expected = prefill_reference(q, keys, values, 2, start)
        theirs = prefill_reference(q, keys, values, 2, start, torch.bfloat16)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        ours = (out.float() - expected).abs().max()
        assert ours <= 2 * (theirs.float() - expected).abs().max() + 1e-3
        if start == 0:  # the first token sees its own value only: exactly that
            first = out[0].view(heads, head_dim)
            for head in range(heads):
                assert torch.equal(first[head], values[2, head // group, 0])


@needs_kernels
@pytest.mark.engine
def test_the_prefill_kernel_refuses_what_it_cannot_compute_with_a_clear_error(kernel):
    keys, values = slot_rows(2, 3, 64)
    q = torch.randn(4, 9, 64).to(torch.bfloat16)
    cases = [
        ((q.float(), keys, values, 1, 10), "bf16 only"),
        ((q, keys, values, keys.size(0), 10), "row or positions out of range"),
        ((q, keys, values, 1, keys.size(2) - 3), "row or positions out of range"),
        ((torch.randn(43, 9, 64).to(torch.bfloat16), keys, values, 1, 0), "at most 128 queries"),
        ((torch.randn(4, 8, 64).to(torch.bfloat16), keys, values, 1, 0), "shapes do not match"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.chat.prefill_attention(*arguments)


def quantized_matrix(outputs, inputs, bits, *, exact=False):
    """A matrix as weights.linear (4 bits) or weights.head (8 bits) quantizes one: (levels, scales,
    minimums, the matrix they stand for in fp32). With `exact`, scales and minimums are powers
    of two (fp16 keeps them exactly), small enough that fp32 sums of their products with int8
    inputs are exact."""
    groups = inputs // native.GROUP
    top = 2**bits - 1
    levels = torch.randint(0, top + 1, (outputs, inputs))
    scale = (torch.rand(outputs, groups) * 0.02 + 1e-3) * 15 / top
    minimum = -(top + 1) / 2 * scale * (0.5 + torch.rand(outputs, groups))
    if exact:
        finest = -9 if bits == 4 else -12
        scale = 2.0 ** torch.randint(finest, finest + 3, (outputs, groups)).float()
        minimum = -(2.0 ** torch.randint(finest, finest + 3, (outputs, groups)).float())
    scale, minimum = scale.half().float(), minimum.half().float()
    spread = native.GROUP
    dense = levels * scale.repeat_interleave(spread, 1) + minimum.repeat_interleave(spread, 1)
    return levels, scale, minimum, dense


def product(bits):
    """The quantized product of `bits`, and the type of its results."""
    if bits == 4:
        return torch.ops.chat.int4_linear, torch.bfloat16
    return torch.ops.chat.int8_linear, torch.float32


def int8_rounded(x):
    """x as the quantized products take it: each group of 32 inputs of a row rounded to 255
    levels, its largest magnitude at 127 (in fp32, as the kernel computes it)."""
    groups = x.float().view(x.size(0), -1, native.GROUP)
    peak = groups.abs().amax(dim=-1, keepdim=True)
    levels = torch.round(groups * torch.where(peak > 0, 127 / peak, 0))
    return (levels * (peak / 127)).view(x.shape)


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("outputs", "inputs"), [(960, 576), (576, 1536), (16, 32)])
def test_the_quantized_products_compute_the_matrix_product(kernel, bits, outputs, inputs):
    """One to fifteen rows (a decode step, a short prompt; past eight the weights are read
    twice), fp32 or bf16 inputs, with a few inputs far larger than the rest, as a norm's output
    has: the product of the matrix with the inputs rounded to int8 in groups of 32, but for the
    result's rounding (int4: bf16 results, int8: fp32 ones); within a few percent of the exact
    product; and each row the same whatever rows share its call."""
    torch.manual_seed(0)
    multiply, result_type = product(bits)
    levels, scale, minimum, dense = quantized_matrix(outputs, inputs, bits)
    packed = native.pack(levels, scale, minimum, bits)
    for rows in (1, 2, 7, 8, 9, 15):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, inputs)
            x[:, 3] *= 30
            x = x.to(dtype)
            out = multiply(x, packed)
            assert out.shape == (rows, outputs) and out.dtype == result_type

            def error(out, expected):
                return ((out.double() - expected).norm() / expected.norm()).item()

            # (fp32 results: the level and minimum terms cancel, ~2e-4 of them is left, up to
            # 1.3e-3 seen with other random inputs.)
            rounding = 3e-3 if result_type == torch.bfloat16 else 2e-3
            assert error(out, int8_rounded(x).double() @ dense.double().T) < rounding
            assert error(out, x.double() @ dense.double().T) < 0.03, (rows, dtype)
            alone = torch.cat([multiply(x[row : row + 1], packed) for row in range(rows)])
            assert torch.equal(out, alone)


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantized_products_are_exact_where_int8_holds_the_inputs(kernel, bits):
    """Inputs that int8 holds exactly (integers, each group's largest 127) and power-of-two
    scales: the integer sums and fp32 arithmetic lose nothing, so the result is the exact
    product (rounded to bf16 for int4). Every level, scale and minimum must sit where the
    kernel reads it (native.pack's layout) for this to hold."""
    multiply, result_type = product(bits)
    levels, scale, minimum, dense = quantized_matrix(64, 96, bits, exact=True)
    packed = native.pack(levels, scale, minimum, bits)
    x = torch.randint(-127, 128, (8, 96)).float()
    x[:, ::32] = 127
    out = multiply(x, packed)
    assert torch.equal(out, (x.double() @ dense.double().T).to(result_type))


@needs_kernels
@pytest.mark.engine
@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantized_products_refuse_what_they_cannot_compute_with_a_clear_error(kernel, bits):
    multiply, _ = product(bits)
    levels, scale, minimum, _ = quantized_matrix(32, 64, bits)
    packed = native.pack(levels, scale, minimum, bits)
    other = native.pack(levels, scale, minimum, 12 - bits)
    cases = [
        ((torch.randn(2, 32), packed), "x has 32 inputs, the weights 64"),
        ((torch.randn(2, 64).half(), packed), "fp32 or bf16"),
        ((torch.randn(64), packed), "fp32 or bf16"),
        ((torch.randn(2, 64), other), f"packed by native.pack with {bits} bits"),
        ((torch.randn(2, 64), levels.to(torch.uint8)), f"packed by native.pack with {bits} bits"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=message):
            multiply(*arguments)
    with pytest.raises(ValueError, match=f"no {bits}-bit product of a 24 x 64 matrix"):
        native.pack(levels[:24], scale[:24], minimum[:24], bits)
    with pytest.raises(ValueError, match=f"no {bits}-bit product of a 32 x 64 matrix"):
        native.pack(levels, scale, minimum * 1e7, bits)  # beyond fp16
    with pytest.raises(ValueError, match=f"no {bits}-bit product of a 32 x 64 matrix"):
        native.pack(levels, scale[:, :1], minimum[:, :1], bits)  # one scale per 64 inputs
    with pytest.raises(ValueError, match="no 6-bit product"):
        native.pack(levels, scale, minimum, 6)


def test_a_matrix_the_quantized_products_cannot_take_goes_to_torchs_kernels():
    from conversations.llm.weights import (
        FbgemmInt8Head,
        Int4Linear,
        Int8Linear,
        NativeInt4Linear,
        NativeInt8Head,
        head,
        linear,
    )

    weight = torch.randn(64, 64)
    assert type(linear(weight, "int4", native_int4=True)) is NativeInt4Linear
    assert type(linear(weight, "int4")) is Int4Linear
    assert type(head(weight, "int4", native_int8=True)) is NativeInt8Head
    assert type(head(weight, "int4")) is FbgemmInt8Head  # FBGEMM's
    # (Inputs not in groups of 32: int8, as without the kernel.)
    assert type(linear(torch.randn(64, 48), "int4", native_int4=True)) is Int8Linear
    assert type(head(torch.randn(64, 48), "int4", native_int8=True)) is FbgemmInt8Head
    weight[0, 0] = 1e8  # a scale beyond fp16
    assert type(linear(weight, "int4", native_int4=True)) is Int4Linear
    assert type(head(weight, "int4", native_int8=True)) is FbgemmInt8Head


@needs_kernels
def test_the_kernel_is_built_into_the_cache_once_and_loaded_from_there(tmp_path):
    """In fresh processes, as at a first start and the starts after it: two starting at once
    over the lock file a build killed midway left behind (torch's own lock would wait for it
    forever), then a third, which builds nothing and loads the library without torch's
    cpp_extension (which builds again whenever torch's headers are reached by another path);
    then, the stamp not matching (as after a change of the sources), a fourth goes through
    cpp_extension again and stamps what it loaded."""
    script = (
        "import sys; from conversations.llm import native; from torch.utils import cpp_extension;"
        "cpp_extension.load = None if sys.argv[2] == 'no-build' else cpp_extension.load;"
        "print(native.load(sys.argv[1]))"
    )
    target = native.choose("true")
    built = tmp_path / "kernels" / target.folder
    built.mkdir(parents=True)
    (built / "lock").touch()

    def start(build="may build"):
        return subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), build],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def results(processes):
        outputs = [process.communicate(timeout=300) for process in processes]
        for process, (_, err) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, err
        return [out.strip() for out, _ in outputs]

    assert results([start(), start()]) == ["True", "True"]
    library, objects = built / native.LIBRARY, list(built.glob("*.o"))
    assert library.is_file() and objects and not (built / "lock").exists()
    made = {path: path.stat().st_mtime_ns for path in [library, *objects]}
    assert results([start("no-build")]) == ["True"]
    assert {path: path.stat().st_mtime_ns for path in made} == made, "built again"
    (built / "stamp").write_text("other sources")
    assert results([start("no-build")]) == ["False"]  # (it would have to build)
    assert results([start()]) == ["True"]  # (cpp_extension finds its build current)
    assert (built / "stamp").read_text() == native._stamp(target)


@pytest.fixture
def kernels_not_loaded(monkeypatch):
    """This process as if no kernels were loaded yet, so that `native.load` tries again. A
    library loaded into a process cannot be unloaded, so the module's record of it is what is
    patched (and put back after the test); the product has no reason to forget it."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_loaded_target", None)


@pytest.mark.usefixtures("kernels_not_loaded")
def test_where_the_kernels_cannot_be_built_the_decoder_uses_torchs(monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "supported", lambda target: True)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load(tmp_path) is False
    assert "Could not build our kernels" in caplog.text
    assert "Ninja is required" in caplog.text

    monkeypatch.setattr(native, "supported", lambda target: False)
    assert native.load(tmp_path) is False


def text_parts(engine, rows=8):
    """SCORED_TEXT in `rows` parts of one length, and each step's next tokens, (steps, rows)."""
    ids = engine.prompt_tokenizer.encode(SCORED_TEXT)
    part = len(ids) // rows
    parts = [ids[row * part : (row + 1) * part] for row in range(rows)]
    return parts, torch.tensor([[tokens[step + 1] for tokens in parts] for step in range(part - 1)])


def read_in_steps(engine, parts):
    """The engine's scores as rows 0..n-1 read their parts one token a step, as n replies are
    written: (steps, rows, vocab). (No reply is in flight: none is parked either.)"""
    decoder, scheduler = engine.decoder, engine.scheduler

    def read():
        assert scheduler.spare_row == 0
        with torch.inference_mode():
            decoder.prefill_many([(row, tokens[:1], 0) for row, tokens in enumerate(parts)])
            steps = [
                decoder.decode([tokens[step] for tokens in parts], [step] * len(parts))
                for step in range(1, len(parts[0]) - 1)
            ]
        return torch.stack(steps)

    return scheduler.call(read).result()


def perplexity(scores, targets):
    return F.cross_entropy(scores.flatten(0, 1), targets[1:].flatten()).exp().item()


@needs_kernels
@pytest.mark.model
def test_decode_steps_of_the_real_model_score_a_text_as_with_torch_attention(default_engine):
    """Eight rows read eight parts of a text one token a step: the scores with the kernel are
    those with torch's attention but for rounding. (Rounding alone moves this model's top token
    at about one step in twenty, and its perplexity over these ~500 tokens by about 1%,
    whichever way attention is rounded: with attention computed exactly in fp32, perplexity
    46.01, torch's bf16 kernel gave 45.73 and ours 45.96, each agreeing with its top token at
    95% of the steps.)"""
    decoder = default_engine.decoder
    assert decoder.native_attention, "built and loaded on this CPU"
    parts, targets = text_parts(default_engine)
    try:
        ours = read_in_steps(default_engine, parts)
        decoder.native_attention = False
        theirs = read_in_steps(default_engine, parts)
    finally:
        decoder.native_attention = True

    assert abs(perplexity(ours, targets) / perplexity(theirs, targets) - 1) < 0.02
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.85
    similarity = F.cosine_similarity(ours.flatten(0, 1), theirs.flatten(0, 1), dim=-1)
    assert similarity.mean() > 0.998 and similarity.min() > 0.95


@needs_kernels
@pytest.mark.model
def test_follow_ups_of_the_real_model_score_a_text_as_with_torch_attention(default_engine):
    """A text read as a conversation's follow-ups are, a run of new tokens at a time over what
    came before (score: eight tokens a pass), attends through our prefill kernel, and scores as
    with torch's attention but for rounding."""
    decoder, scheduler = default_engine.decoder, default_engine.scheduler
    assert decoder.native_prefill, "built and loaded on this CPU"
    ids = default_engine.prompt_tokenizer.encode(SCORED_TEXT)
    targets = torch.tensor(ids[1:])

    def score():
        with torch.inference_mode():
            return decoder.score(scheduler.spare_row, ids, 0)[:-1]

    try:
        ours = scheduler.call(score).result()
        decoder.native_prefill = False
        theirs = scheduler.call(score).result()
    finally:
        decoder.native_prefill = True

    def perplexity_of(scores):
        return F.cross_entropy(scores, targets).exp().item()

    assert abs(perplexity_of(ours) / perplexity_of(theirs) - 1) < 0.02
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.85
    assert F.cosine_similarity(ours, theirs, dim=-1).mean() > 0.998


@needs_kernels
@pytest.mark.model
def test_follow_ups_read_together_attend_as_with_torch_attention(default_engine):
    """Three conversations' follow-ups of different lengths read in one pass (padded to the
    longest) attend through our kernel a run at a time: the scores after each are those of
    torch's attention over the padded runs but for rounding, and so are the keys written."""
    decoder, scheduler = default_engine.decoder, default_engine.scheduler
    ids = default_engine.prompt_tokenizer.encode(SCORED_TEXT)
    histories = [ids[:300], ids[50:60], ids[100:400]]
    follow_ups = [ids[300:325], ids[60:63], ids[400:417]]
    runs = [(row, tokens, len(histories[row])) for row, tokens in enumerate(follow_ups)]

    def read():
        assert scheduler.spare_row == 0  # rows 0-2 are free: none is parked
        with torch.inference_mode():
            for row, history in enumerate(histories):
                decoder.prefill(row, history, 0)
            scores = decoder.prefill_many(runs)
            return scores, decoder.cache.keys[-1][:3, :, :417].clone()

    try:
        ours, our_keys = scheduler.call(read).result()
        decoder.native_prefill = False
        theirs, their_keys = scheduler.call(read).result()
    finally:
        decoder.native_prefill = True

    assert F.cosine_similarity(ours, theirs, dim=-1).min() > 0.995
    for row, (history, tokens) in enumerate(zip(histories, follow_ups, strict=True)):
        written = slice(0, len(history) + len(tokens))  # (each key, in the last layer)
        mine, torchs = our_keys[row, :, written].float(), their_keys[row, :, written].float()
        assert F.cosine_similarity(mine, torchs, dim=-1).min() > 0.999


@needs_kernels
@pytest.mark.model
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_steps_of_the_real_model_score_a_text_as_with_torchs_kernels(
    default_engine, torch_kernels_engine, rows
):
    """One reply, or eight, read a text one token a step: with our quantized products (inputs
    rounded to int8 in groups of 32) the scores are those of torch's kernels (int4 on bf16
    inputs; FBGEMM's int8 for the head, and at eight rows for query-key-value and gate-up) but
    for rounding. (Run for the AVX2 products in `make test`'s pass with torch limited to AVX2.)"""
    assert type(default_engine.decoder.layers[0].qkv) is weights.NativeInt4Linear
    assert type(torch_kernels_engine.decoder.layers[0].qkv) is weights.Int4Linear
    parts, targets = text_parts(default_engine, rows)
    ours = read_in_steps(default_engine, parts)
    theirs = read_in_steps(torch_kernels_engine, parts)

    assert abs(perplexity(ours, targets) / perplexity(theirs, targets) - 1) < 0.02
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.8
    similarity = F.cosine_similarity(ours.flatten(0, 1), theirs.flatten(0, 1), dim=-1)
    assert similarity.mean() > 0.99


@pytest.mark.model
def test_the_setting_turns_the_kernels_off(torch_kernels_engine, request):
    from torch.profiler import profile

    off = torch_kernels_engine
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in off.generate(messages, GenerationParams(max_new_tokens=16)).text
    assert off.decoder.native_attention is False

    def calls(engine):
        """Of a two-reply step, per layer: (our attention, torch's, our int4 products, torch's);
        and (our head product, FBGEMM's)."""
        assert engine.scheduler.spare_row == 0  # rows 0 and 1 are free: none is parked
        with torch.inference_mode(), profile() as trace:
            engine.decoder.decode([42, 42], [3, 5])
        counts = {event.key: event.count for event in trace.key_averages()}
        per_layer = [
            "chat::decode_attention",
            "aten::scaled_dot_product_attention",
            "chat::int4_linear",
            "aten::_weight_int4pack_mm_for_cpu",
        ]
        layers = len(engine.decoder.layers)
        head = ["chat::int8_linear", "quantized::linear_dynamic"]
        return (
            tuple(counts.get(name, 0) // layers for name in per_layer),
            tuple(counts.get(name, 0) for name in head),
        )

    assert off.scheduler.call(lambda: calls(off)).result() == ((0, 1, 0, 4), (0, 1))
    if KERNELS_RUN_HERE:
        on = request.getfixturevalue("default_engine")
        assert on.scheduler.call(lambda: calls(on)).result() == ((1, 0, 4, 0), (1, 0))


@pytest.mark.model
def test_each_kernel_path_tested_is_the_one_the_engine_runs(real_engine, request):
    """The real-model tests run on each path of conftest.KERNEL_PATHS: ours (every layer's
    products and decode attention) or torch's alone. With torch limited to AVX2 (the run of
    `make test` with ATEN_CPU_CAPABILITY=avx2, as on a CPU without AVX-512), ours are the AVX2
    builds."""
    path = request.node.callspec.params["real_engine"]
    decoder, ours = real_engine.decoder, path == "ours"
    assert decoder.native is ours and decoder.native_attention is ours
    assert decoder.native_prefill is ours
    expected = weights.NativeInt4Linear if ours else weights.Int4Linear
    assert {type(layer.qkv) for layer in decoder.layers} == {expected}
    if ours:
        target = native.loaded_target()
        assert target is native.choose(KERNEL_SETTING)
        if KERNEL_SETTING == "true":
            wide = torch.backends.cpu.get_cpu_capability() == "AVX512"
            assert target.registers == (512 if wide else 256)


@pytest.mark.usefixtures("kernels_not_loaded")
def test_torch_limited_to_less_chooses_the_kernels_for_that(monkeypatch, tmp_path):
    """ATEN_CPU_CAPABILITY rules out what torch is limited from, for ours too: AVX2 leaves the
    AVX2 kernels, less leaves none. A named set the CPU (or torch) lacks is none either."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native.supported(native.AVX512)
    assert native.choose("avx512") is None and native.choose("false") is None
    if torch.cpu._is_avx2_supported():
        assert native.choose("avx2") is native.AVX2
        assert native.choose("true") in (native.AVX2_VNNI, native.AVX2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert native.choose("true") is None and native.choose("avx2") is None
    assert native.load(tmp_path) is False


AVX2_ENGINE = """
import json, sys, torch
from conversations.llm import native
from conversations.llm.engine import Engine, GenerationParams
engine = Engine(model="", cache_dir=sys.argv[1])
messages = [{"role": "user", "content": "What is the capital of France?"}]
answer = engine.generate(messages, GenerationParams(max_new_tokens=16)).text
decoder = engine.decoder
target = native.loaded_target()
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "kernels": target.name if target else None,
    "ours": [decoder.native, decoder.native_attention],
    "formats": sorted({type(layer.qkv).__name__ for layer in decoder.layers}),
    "paris": "Paris" in answer,
}))
"""


@pytest.mark.model
@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ("avx2", {"kernels": "avx2", "ours": [True, True], "formats": ["NativeInt4Linear"]}),
        ("default", {"kernels": None, "ours": [False, False], "formats": ["Int4Linear"]}),
    ],
)
def test_with_torch_limited_the_engine_answers_on_the_kernels_left(capability, expected):
    """An operator who limits torch to AVX2 (or a CPU without AVX-512) gets our AVX2 kernels
    with the default setting; limited to less than AVX2, torch's
    kernels only. The model answers either way."""
    if capability == "avx2" and not torch.cpu._is_avx2_supported():
        pytest.skip("no AVX2 here")
    onednn = {"avx2": "AVX2", "default": "SSE41"}[capability]
    limited = {"ATEN_CPU_CAPABILITY": capability, "ONEDNN_MAX_CPU_ISA": onednn}
    result = run_python("-c", AVX2_ENGINE, str(settings.CHATBOT_MODEL_CACHE), env=limited)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "capability": capability.upper(),
        **expected,
        "paris": True,
    }


@pytest.mark.usefixtures("kernels_not_loaded")
def test_avx2_vnni_by_name_is_the_instruction_the_cpu_has(monkeypatch):
    """`avx2-vnni` is the AVX2 products with VNNI's dot products: AVX-VNNI's encoding on a CPU
    that has it, the AVX-512 VL one (the same instruction, the same code) on a CPU with AVX-512
    VNNI only, none on a CPU with neither. `true` prefers AVX-512, then AVX-VNNI, then AVX2."""
    flags = native.cpu_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    monkeypatch.setattr(native, "cpu_flags", lambda: flags | {"avx_vnni"})
    assert native.choose("avx2-vnni") is native.AVX2_VNNI
    assert native.choose("true") is native.AVX512
    monkeypatch.setattr(native, "cpu_flags", lambda: flags - {"avx_vnni"})
    assert native.choose("avx2-vnni") is native.AVX512_AS_AVX2_VNNI
    assert "-DCHAT_KERNELS_256" in native.AVX512_AS_AVX2_VNNI.flags
    # Named, it stands for an AVX-VNNI CPU's kernels with torch limited to AVX2 too; by
    # default, AVX-512 limited away leaves plain AVX2.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert native.choose("avx2-vnni") is native.AVX512_AS_AVX2_VNNI
    assert native.choose("true") is native.AVX2
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert native.choose("avx2-vnni") is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(native, "cpu_flags", lambda: flags | {"avx_vnni"})
    assert native.choose("true") is native.AVX2_VNNI


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler here")
def test_the_avx_vnni_build_takes_avx_vnnis_dot_products(tmp_path):
    """No CPU here need have AVX-VNNI, so that build is compiled, not run (its code runs in the
    `avx2-vnni` pass through AVX-512 VL's encoding of the same instruction): the products
    compile with its flags into the VEX-encoded dot products, and no AVX-512 instruction."""
    from torch.utils import cpp_extension

    source = Path(native.__file__).with_name("quantized_linear.cpp")
    assembly = tmp_path / "quantized_linear.s"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    command = ["c++", "-std=c++17", "-S", *native.AVX2_VNNI.flags, *includes, str(source)]
    result = subprocess.run(
        [*command, "-o", str(assembly)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    text = assembly.read_text()
    assert "{vex} vpdpbusd" in text and "zmm" not in text and "vpmaddubsw" not in text
