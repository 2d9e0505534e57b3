"""Counting a chat's prompt tokens for a model served elsewhere, so that a long history is
trimmed to the served model's window before it is sent, never sent to fail.

Three ways, best first: the model's own tokenizer and chat template from a local folder
(`CHATBOT_TOKENIZER`); the server's tokenize endpoint (vLLM's `/tokenize`, llama.cpp's
`/apply-template` + `/tokenize`); else an estimate that never counts too few (one token per
UTF-8 byte, plus room for each message's template markers), which trims more than it needs to.
None of them imports torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import httpx

from .interface import ChatMessage

logger = logging.getLogger(__name__)

# The estimate's room for the chat template's markers: per message (role headers, end-of-turn
# tokens) and once per prompt (a beginning-of-text token, the assistant's header).
ESTIMATE_TOKENS_PER_MESSAGE = 8
ESTIMATE_TOKENS_PER_PROMPT = 16


class TokenCounter(Protocol):
    name: str  # how the counting is done, for the logs and the operator

    def count(self, messages: list[ChatMessage]) -> int: ...


class LocalTokenizer:
    """The served model's tokenizer.json and chat template, read from a local folder (the
    files a Hugging Face model folder holds, or that `prepare_model` writes)."""

    name = "local tokenizer"

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render = render_jinja_template
        self.folder = folder
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ValueError(
                f"CHATBOT_TOKENIZER={folder}: no readable tokenizer.json ({exc})"
            ) from None
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template_file = folder / "chat_template.jinja"
        self.template = (
            template_file.read_text() if template_file.exists() else config.get("chat_template")
        )
        if not self.template:
            raise ValueError(f"CHATBOT_TOKENIZER={folder}: the folder has no chat template")
        self.special = {
            key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")
        }

    def count(self, messages: list[ChatMessage]) -> int:
        rendered, _ = self._render(
            conversations=[list(messages)],
            chat_template=self.template,
            add_generation_prompt=True,
            **self.special,
        )
        return len(self.tokenizer.encode(rendered[0], add_special_tokens=False).ids)


class VllmTokenize:
    """vLLM's `POST /tokenize` with the messages: the server applies its own chat template."""

    name = "the server's /tokenize (vLLM)"

    def __init__(self, client: httpx.Client, root: str, model: str) -> None:
        self.client, self.url, self.model = client, f"{root}/tokenize", model

    def count(self, messages: list[ChatMessage]) -> int:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        answer = self.client.post(self.url, json=body)
        answer.raise_for_status()
        return int(answer.json()["count"])


class LlamaCppTokenize:
    """llama.cpp's server: `POST /apply-template` renders the chat, `POST /tokenize` counts."""

    name = "the server's /apply-template and /tokenize (llama.cpp)"

    def __init__(self, client: httpx.Client, root: str) -> None:
        self.client, self.root = client, root

    def count(self, messages: list[ChatMessage]) -> int:
        rendered = self.client.post(f"{self.root}/apply-template", json={"messages": messages})
        rendered.raise_for_status()
        answer = self.client.post(
            f"{self.root}/tokenize", json={"content": rendered.json()["prompt"]}
        )
        answer.raise_for_status()
        return len(answer.json()["tokens"])


class Estimate:
    """No tokenizer at hand: a count that is never too low for a byte-level or byte-fallback
    tokenizer (each token holds at least one byte)."""

    name = "an estimate (one token per byte)"

    def count(self, messages: list[ChatMessage]) -> int:
        text = sum(len(m["content"].encode()) + len(m["role"]) for m in messages)
        return text + ESTIMATE_TOKENS_PER_MESSAGE * len(messages) + ESTIMATE_TOKENS_PER_PROMPT


def pick_counter(
    client: httpx.Client, root: str, model: str, tokenizer_folder: str
) -> TokenCounter:
    """The best way to count this server's tokens that works (see the module's docstring)."""
    if tokenizer_folder:
        return LocalTokenizer(Path(tokenizer_folder))
    probe: list[ChatMessage] = [{"role": "user", "content": "Hello"}]
    for counter in (VllmTokenize(client, root, model), LlamaCppTokenize(client, root)):
        try:
            if counter.count(probe) > 0:
                return counter
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            continue
    return Estimate()


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
