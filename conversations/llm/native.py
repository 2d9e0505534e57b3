"""Kernels of our own, compiled on this machine: `chat::int4_linear` and `chat::int8_linear`
(quantized_linear.cpp), the layers' int4 and the output head's int8 matrix products for decode
steps and short prompts, `chat::decode_attention` (decode_attention.cpp), the attention of a
decode step, and `chat::prefill_attention` (prefill_attention.cpp), that of a follow-up
message's few new tokens over a long history.

They come in three instruction sets (TARGETS): AVX-512 with its bf16 and int8 dot products,
AVX2 with FMA and F16C, which CPUs without AVX-512 have, and AVX2 with AVX-VNNI's int8 dot
products (Intel's Alder Lake and later). The best the CPU has is used, or the one that
CHATBOT_NATIVE_KERNELS names (`avx2` or `avx2-vnni` on an AVX-512 machine tests and measures
the others).

They are built the first time a model loads (about 20 s with the C++ compiler that pip needs for
packages that compile; `prepare_model` does it at install) into a folder of the model cache
named after the instruction sets they were built for, then loaded from there in milliseconds.
Where the CPU lacks those instructions, torch is limited to less (ATEN_CPU_CAPABILITY), or the
build fails, the decoder uses torch's kernels instead (scaled_dot_product_attention, the int4
and FBGEMM int8 products); the log says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """An instruction set the kernels are built for. Its folder is named after it, so that a
    model cache copied to another machine never loads code for instructions that machine
    lacks. `cpu`: the flags /proc/cpuinfo must list for it, beyond what torch checks."""

    name: str
    folder: str
    flags: tuple[str, ...]
    registers: int = 256
    cpu: tuple[str, ...] = ()

    @property
    def sources(self) -> list[Path]:
        names = ["quantized_linear.cpp", "decode_attention.cpp", "prefill_attention.cpp"]
        return [Path(__file__).with_name(name) for name in names]


_AVX2_FLAGS = ("-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c")
AVX512 = Target(
    "avx512",
    "avx512-bf16-vnni",
    (
        "-O3",
        "-fopenmp",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512bf16",
        "-mavx512vnni",
        "-mfma",
    ),
    registers=512,
)
AVX2 = Target("avx2", "avx2-fma-f16c", _AVX2_FLAGS)
# The AVX2 kernels with VNNI's dot products on 256-bit registers (quantized_linear.cpp): Intel's
# Alder Lake and later, AMD's Zen 5 have them as AVX-VNNI. A CPU with AVX-512 VNNI has the same
# instruction in its AVX-512 VL encoding: there the same code builds as AVX512_AS_AVX2_VNNI, so
# that an AVX-512 machine runs (tests, measures) what AVX-VNNI CPUs run, by name only.
AVX2_VNNI = Target(
    "avx2-vnni", "avx2-fma-f16c-avxvnni", (*_AVX2_FLAGS, "-mavxvnni"), cpu=("avx_vnni",)
)
AVX512_AS_AVX2_VNNI = Target(
    "avx2-vnni",
    "avx2-fma-f16c-avx512vnni-vl",
    # (Its own instructions in 256-bit registers only, as an AVX-VNNI CPU runs them.)
    (*_AVX2_FLAGS, "-mavx512vnni", "-mavx512vl", "-mprefer-vector-width=256", "-DCHAT_KERNELS_256"),
)
TARGETS = {target.name: target for target in (AVX512, AVX2_VNNI, AVX2)}
# What CHATBOT_NATIVE_KERNELS may say: the best the CPU has, none, or one by name.
CHOICES = ("true", "false", *TARGETS)
LIBRARY = "chat_kernels.so"
# The quantized products' layout (see pack): groups of GROUP inputs, blocks of BLOCK outputs.
GROUP = 32
BLOCK = 16
FP16_MAX = 65504.0
# The most queries of a key-value head (query heads a group times new tokens) prefill_attention
# takes: its sums are kept in registers by blocks of 16. Longer runs are blocks of queries that
# torch's flash-attention kernel is made for.
PREFILL_QUERIES = 128

# Scripted code names the operations, so their schemas exist whether or not the kernels are built.
_library = torch.library.Library("chat", "DEF")
_library.define("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor lengths) -> Tensor")
_library.define(
    "prefill_attention(Tensor q, Tensor keys, Tensor values, int row, int start) -> Tensor"
)
_library.define("int4_linear(Tensor x, Tensor packed) -> Tensor")
_library.define("int8_linear(Tensor x, Tensor packed) -> Tensor")

_lock = threading.Lock()
_loaded: Path | None = None
_loaded_target: Target | None = None


def supported(target: Target = AVX512) -> bool:
    """Whether `target`'s kernels may run here: the CPU has its instructions, and torch is not
    limited to less. (An operator who sets ATEN_CPU_CAPABILITY=avx2 rules AVX-512 out for
    torch's kernels; ours stay off too, as on a CPU without it. Torch's check of the CPU's
    instructions does not see that limit.)"""
    capability = torch.backends.cpu.get_cpu_capability()
    if target is AVX512:
        names = ("_is_avx512_bf16_supported", "_is_vnni_supported")
        allowed = capability.startswith("AVX512")
    elif target is AVX512_AS_AVX2_VNNI:
        # (Named only: with torch limited to AVX2, it stands for an AVX-VNNI CPU's kernels.)
        names = ("_is_avx512_supported", "_is_vnni_supported")
        allowed = capability.startswith(("AVX2", "AVX512"))
    else:
        names = ("_is_avx2_supported",)
        allowed = capability.startswith(("AVX2", "AVX512"))
    checks = [getattr(torch.cpu, name, None) for name in names]  # (torch's, not public)
    return (
        allowed
        and all(check is not None and check() for check in checks)
        and set(target.cpu) <= cpu_flags()
    )


def cpu_flags() -> set[str]:
    """The CPU's flags as Linux lists them (none where it does not)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def choose(setting: str | bool) -> Target | None:
    """The target to build for a CHATBOT_NATIVE_KERNELS setting: the best the CPU supports
    (`true`), none (`false`), or the one named, if the CPU supports it (else none, logged).
    `avx2-vnni` on a CPU with AVX-512 VNNI but not AVX-VNNI: the same code in the encoding
    that CPU has (AVX512_AS_AVX2_VNNI)."""
    setting = str(setting).lower()
    if setting == "false":
        return None
    if setting == "true":
        best = next((t for t in (AVX512, AVX2_VNNI, AVX2) if supported(t)), None)
        if best is None:
            logger.info(
                "Neither AVX-512 BF16 and VNNI nor AVX2 here (or torch is limited to less: "
                "ATEN_CPU_CAPABILITY): the decoder uses torch's kernels"
            )
        return best
    target = TARGETS[setting]
    if target is AVX2_VNNI and not supported(target) and supported(AVX512_AS_AVX2_VNNI):
        return AVX512_AS_AVX2_VNNI
    if not supported(target):
        logger.warning(
            "CHATBOT_NATIVE_KERNELS=%s, but this CPU lacks them: torch's kernels", setting
        )
        return None
    return target


def is_loaded() -> bool:
    """Whether the kernels are loaded into this process (by `load`)."""
    return _loaded is not None


def loaded_target() -> Target | None:
    return _loaded_target


def attention_fits(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the loaded kernels attend for a model of this shape: bf16 keys and values, heads
    of 64 or 128 values, one to four query heads to a key-value head (decode_attention.cpp's
    `pick`; prefill_attention takes those too, up to PREFILL_QUERIES queries a run)."""
    return (
        _loaded_target is not None
        and dtype == torch.bfloat16
        and head_dim in (64, 128)
        and heads % kv_heads == 0
        and 1 <= heads // kv_heads <= 4
    )


def quantized_fits(shape: torch.Size, scale: torch.Tensor, minimum: torch.Tensor) -> bool:
    """Whether the quantized products take a matrix of this shape (outputs, inputs), with these
    scales and minimums: one per GROUP inputs, within fp16's range (see pack)."""
    outputs, inputs = shape
    return (
        outputs % BLOCK == 0
        and inputs % GROUP == 0
        and scale.shape == minimum.shape == (outputs, inputs // GROUP)
        and max(scale.abs().max().item(), minimum.abs().max().item()) <= FP16_MAX
    )


def pack(
    levels: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int
) -> torch.Tensor:
    """A matrix w = levels * scale + minimum as int4_linear (bits=4, levels 0..15) or
    int8_linear (bits=8, levels 0..255) reads it: `levels` (outputs, inputs); `scale` and
    `minimum` (outputs, inputs / GROUP), one per group of inputs, kept as fp16. Returns uint8
    (outputs / BLOCK, groups, 64 * bits + 64): for each block of 16 outputs and group of 32
    inputs, `bits` runs of 64 bytes, then the 16 scales and the 16 minimums. 4 bits: byte
    4i + t of run c holds output i's levels of inputs 4c + t in its low four bits and 16 + 4c + t
    in its high four; 8 bits: byte 4i + t of run c, output i's level of input 4c + t."""
    outputs, inputs = levels.shape
    if bits not in (4, 8) or not quantized_fits(levels.shape, scale, minimum):
        raise ValueError(
            f"no {bits}-bit product of a {outputs} x {inputs} matrix with these scales"
        )
    blocks, groups = outputs // BLOCK, inputs // GROUP
    levels = levels.to(torch.uint8)
    if bits == 4:
        # (block, output i, group, half, run c, t) -> (block, group, half, run c, output i, t)
        order = levels.view(blocks, BLOCK, groups, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
        runs = order[:, :, 0] | (order[:, :, 1] << 4)
    else:
        # (block, output i, group, run c, t) -> (block, group, run c, output i, t)
        runs = levels.view(blocks, BLOCK, groups, 8, 4).permute(0, 2, 3, 1, 4)

    def per_group(values: torch.Tensor) -> torch.Tensor:
        values = values.to(torch.float16).view(blocks, BLOCK, groups).transpose(1, 2)
        return values.contiguous().view(torch.uint8)

    runs = runs.reshape(blocks, groups, 64 * bits)
    return torch.cat([runs, per_group(scale), per_group(minimum)], dim=-1).contiguous()


def load(cache_root: Path | str, setting: str | bool = "true") -> bool:
    """Build the kernels the setting chooses (see `choose`) into `cache_root` (once: later
    calls find them built) and load them into this process. False, with the reason logged,
    where they cannot be. A process holds one target's: a later call for another is refused."""
    global _loaded, _loaded_target
    with _lock:
        target = choose(setting)
        if _loaded is not None:
            if target is not None and target is not _loaded_target:
                logger.warning(
                    "The %s kernels are loaded in this process; %s ones cannot be as well",
                    _loaded_target.name if _loaded_target else "",
                    target.name,
                )
                return False
            return target is not None
        if target is None:
            return False
        # (Resolved: ninja builds again for another spelling of the same folder.)
        directory = Path(cache_root).resolve() / "kernels" / target.folder
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # One process builds at a time. torch's own lock is a file that a process killed
            # mid-build leaves behind, and every later start would wait for it forever: ours
            # is released with its process, and while we hold it theirs can only be stale.
            with open(directory / "build.lock", "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                path = _load_built(directory, target) or _build(directory, target)
        except Exception:
            logger.warning(
                "Could not build our kernels (they need a C++ compiler and ninja); the decoder "
                "uses torch's",
                exc_info=True,
            )
            return False
        _loaded, _loaded_target = path, target
        logger.info("Kernels (%s) loaded from %s", target.name, path)
        return True


def _stamp(target: Target) -> str:
    """What a build is made from: the sources and the header they share, the flags, torch and
    Python."""
    digest = hashlib.sha256()
    headers = [Path(__file__).with_name(name) for name in ("simd.h", "softmax_exp.h")]
    for source in [*target.sources, *headers]:
        digest.update(source.read_bytes())
    digest.update(" ".join([*target.flags, torch.__version__, sys.version]).encode())
    return digest.hexdigest()


def _load_built(directory: Path, target: Target) -> Path | None:
    """The library built before from these very sources, loaded; None if there is none. (Not
    through torch's cpp_extension, which builds again whenever the path it includes torch's
    headers from is spelled differently, as when the virtualenv is reached through a link.)"""
    library, stamp = directory / LIBRARY, directory / "stamp"
    if not library.is_file() or not stamp.is_file() or stamp.read_text() != _stamp(target):
        return None
    torch.ops.load_library(str(library))
    return library


def _build(directory: Path, target: Target) -> Path:
    """Build the library with torch's cpp_extension (which loads it), and stamp it."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # The ninja that pip installed, in a virtualenv not on PATH (a server started as
        # .venv/bin/gunicorn).
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    (directory / "lock").unlink(missing_ok=True)
    (directory / "stamp").unlink(missing_ok=True)
    path = cpp_extension.load(
        name=LIBRARY.removesuffix(".so"),
        sources=[str(source) for source in target.sources],
        extra_cflags=list(target.flags),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )
    (directory / "stamp").write_text(_stamp(target))
    return Path(path)
