"""How a chat becomes the prompt a model reads, and how its window is shared between the prompt
and the reply: one format per kind of model.

Causal chat models read the messages as their own chat template renders them; seq2seq dialogue
models (Blenderbot) read the turns joined into one text, the way they were trained.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .interface import ChatMessage, GenerationParams
from .tokens import SAMPLE_CONVERSATION, PromptTokenizer

# Used only for causal models whose tokenizer ships no chat template.
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Blenderbot separates dialogue turns by two spaces.
SEQ2SEQ_TURN_SEPARATOR = "  "

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    text: str | None  # as the chat template renders it (None for a seq2seq model's turns)
    ids: tuple[int, ...]


class PromptFormat(ABC):
    @abstractmethod
    def render(self, messages: list[ChatMessage]) -> Prompt:
        """The prompt for these messages, ready for the model to answer."""

    @abstractmethod
    def reply_budget(self, params: GenerationParams, window: int) -> int:
        """Tokens set aside for the reply in a window of `window` tokens."""

    @abstractmethod
    def prompt_budget(self, params: GenerationParams, window: int) -> int:
        """Tokens left for the prompt once the reply budget is set aside."""

    @abstractmethod
    def remember(self, prompt: Prompt, written: list[int], text: str) -> None:
        """Note the ids a reply to `prompt` was written in (its stop token left out), for the
        next turn's prompt to hold them."""


class ChatTemplate(PromptFormat):
    """A causal chat model's prompt: its chat template (a plain transcript if it has none),
    tokenized reusing the last prompts' ids (`encoder`, see tokens.PromptTokenizer)."""

    def __init__(self, tokenizer: Any, *, max_bytes: int) -> None:
        if not tokenizer.chat_template:
            tokenizer.chat_template = PLAIN_TRANSCRIPT_TEMPLATE
        self.tokenizer = tokenizer
        self.encoder = _prompt_tokenizer(tokenizer, max_bytes)

    def render(self, messages: list[ChatMessage]) -> Prompt:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return Prompt(text, tuple(self.encoder.encode(text)))

    def reply_budget(self, params: GenerationParams, window: int) -> int:
        # Never more than half the window, so a model with a short window still reads the
        # message it answers.
        return min(params.max_new_tokens, window // 2)

    def prompt_budget(self, params: GenerationParams, window: int) -> int:
        return window - self.reply_budget(params, window)

    def remember(self, prompt: Prompt, written: list[int], text: str) -> None:
        """See tokens.PromptTokenizer.remember. Only ever a saving: should it fail, the reply
        is still whole and the next prompt is tokenized as usual."""
        if prompt.text is None:
            return
        try:
            self.encoder.remember(prompt.text, list(prompt.ids), written, text)
        except Exception:
            logger.exception("Could not remember the ids of a reply; the next turn reads it again")


class JoinedTurns(PromptFormat):
    """A seq2seq dialogue model's prompt: the turns' texts joined, read by the encoder."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[ChatMessage]) -> Prompt:
        text = SEQ2SEQ_TURN_SEPARATOR.join(m["content"] for m in messages)
        return Prompt(None, tuple(self.tokenizer(text)["input_ids"]))

    def reply_budget(self, params: GenerationParams, window: int) -> int:
        # The decoder has positions of its own (as many as the encoder, at most).
        return min(params.max_new_tokens, window - 1)

    def prompt_budget(self, params: GenerationParams, window: int) -> int:
        # The encoder reads the prompt; the decoder writes the reply in its own positions.
        return window

    def remember(self, prompt: Prompt, written: list[int], text: str) -> None:
        pass  # (the joined turns are tokenized whole every time)


def _prompt_tokenizer(tokenizer: Any, max_bytes: int) -> PromptTokenizer:
    """Prompt tokenization reusing the last prompts' ids, if this tokenizer allows (tokens.py)."""
    prompts = PromptTokenizer(tokenizer, max_bytes=max_bytes)
    try:
        sample = tokenizer.apply_chat_template(
            SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that refuses the sample (no system role, say)
        logger.info("The chat template refused the sample; prompts are tokenized whole")
        return prompts
    reply = next(m["content"] for m in SAMPLE_CONVERSATION if m["role"] == "assistant")
    if not prompts.check(sample, reply):
        logger.info("This tokenizer does not encode pieces alone; prompts are tokenized whole")
    return prompts
