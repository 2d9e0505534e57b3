"""A kernel of our own, compiled on this machine: `chat::decode_attention` (decode_attention.cpp),
the attention of a decode step, for CPUs with AVX-512 BF16.

It is built the first time a model loads (about 15 s with the C++ compiler that pip needs for
packages that compile; `prepare_model` does it at install) into a folder of the model cache
named after the instruction sets it was built for, then loaded from there in milliseconds.
Where the CPU lacks those instructions, or the build fails, the decoder attends with torch's
scaled_dot_product_attention instead, as it does for the other steps; the log says why.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
# What the build targets: the folder it goes to is named after it, so that a model cache
# copied to another machine never loads code for instructions that machine lacks.
TARGET = "avx512bf16"
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]

# Scripted code names the operation, so its schema exists whether or not the kernel is built.
_library = torch.library.Library("chat", "DEF")
_library.define("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor lengths) -> Tensor")

_lock = threading.Lock()
_loaded: Path | None = None


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX-512 with its bf16 dot products)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # (torch's, not public)
    return bool(check and check())


def fits(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes a model of this shape: bf16 keys and values, heads of 64 or
    128 values, one to four query heads to a key-value head (decode_attention.cpp's `pick`)."""
    return (
        dtype == torch.bfloat16
        and head_dim in (64, 128)
        and heads % kv_heads == 0
        and 1 <= heads // kv_heads <= 4
    )


def load_decode_attention(cache_root: Path | str) -> bool:
    """Build the kernel into `cache_root` (once: later calls find it built) and load it into
    this process. False, with the reason logged, where it cannot be."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return True
        if not supported():
            logger.info("This CPU has no AVX-512 BF16: decode steps attend with torch's kernel")
            return False
        # (Resolved: ninja builds again for another spelling of the same folder.)
        directory = Path(cache_root).resolve() / "kernels" / TARGET
        try:
            from torch.utils import cpp_extension

            if shutil.which("ninja") is None:
                # The ninja that pip installed, in a virtualenv not on PATH (a server started
                # as .venv/bin/gunicorn).
                import ninja

                os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
            directory.mkdir(parents=True, exist_ok=True)
            # One process builds at a time. torch's own lock is a file that a process killed
            # mid-build leaves behind, and every later start would wait for it forever: ours
            # is released with its process, and while we hold it theirs can only be stale.
            with open(directory / "build.lock", "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                (directory / "lock").unlink(missing_ok=True)
                path = cpp_extension.load(
                    name="chat_decode_attention",
                    sources=[str(SOURCE)],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(directory),
                    is_python_module=False,
                )
        except Exception:
            logger.warning(
                "Could not build the decode-attention kernel (it needs a C++ compiler and "
                "ninja); decode steps attend with torch's kernel",
                exc_info=True,
            )
            return False
        _loaded = Path(path)
        logger.info("Decode-attention kernel loaded from %s", path)
        return True
