"""Use cases. Views, the API and management commands call these and nothing below them.

Rows are written in short transactions; generation, the slow part, runs outside any transaction,
so a user message that was accepted is stored whatever happens while the model writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .context import build_context
from .errors import ContextOverflow, GenerationFailed
from .models import Conversation, Message
from .runtime import default_generation_params, get_engine

logger = logging.getLogger(__name__)

TITLE_LENGTH = 60


@dataclass(frozen=True)
class Exchange:
    user_message: Message
    reply: Message


def fallback_title(content: str) -> str:
    """A title from the first user message: its first line, cut at a word boundary."""
    line = " ".join(content.strip().split("\n", 1)[0].split())
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[:TITLE_LENGTH].rsplit(" ", 1)[0] or line[:TITLE_LENGTH]
    return cut.rstrip(" ,.;:") + "…"


def create_conversation(
    *, owner, title: str = "", system_prompt: str | None = None
) -> Conversation:
    """A new, empty conversation. Without a system prompt, the configured default is stored,
    so the conversation shows exactly what the model is told."""
    if system_prompt is None:
        system_prompt = settings.CHATBOT_SYSTEM_PROMPT
    return Conversation.objects.create(
        owner=owner, title=title.strip(), system_prompt=system_prompt
    )


def post_message(*, conversation: Conversation, content: str) -> Exchange:
    """Store the user's message, have the model answer it, store the answer.

    Raises GenerationFailed (or ContextOverflow) after saving both the user message and a reply
    with status error and the reason; the exception carries the saved exchange.
    """
    now = timezone.now()
    with transaction.atomic():
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=content, created_at=now
        )
        changes = {"updated_at": now}
        if not conversation.title:
            changes["title"] = fallback_title(content)
        Conversation.objects.filter(pk=conversation.pk).update(**changes)
        for field, value in changes.items():
            setattr(conversation, field, value)

    engine = get_engine()
    params = default_generation_params()
    try:
        context = build_context(
            conversation, new_message=user_message, engine=engine, params=params
        )
        generation = engine.generate(context.messages, params)
    except ContextOverflow as exc:
        reply = _save_failed_reply(conversation, engine, params, reason=exc.detail)
        exc.exchange = Exchange(user_message, reply)
        raise
    except Exception as exc:
        logger.exception("Generation failed in conversation %s", conversation.pk)
        reason = f"{type(exc).__name__}: {exc}"
        reply = _save_failed_reply(conversation, engine, params, reason=reason)
        raise GenerationFailed(
            f"The model could not answer: {reason}. Your message was saved; try again.",
            exchange=Exchange(user_message, reply),
        ) from exc

    with transaction.atomic():
        reply = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            content=generation.text,
            model=engine.model_name,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            ttft_ms=generation.ttft_ms,
            total_ms=generation.total_ms,
            context_turns=context.context_turns,
            generation_params={**params.as_dict(), "finish_reason": generation.finish_reason},
        )
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=reply.created_at)
    return Exchange(user_message, reply)


def start_conversation(
    *, owner, content: str, title: str = "", system_prompt: str | None = None
) -> tuple[Conversation, Exchange]:
    """A new conversation with its first message answered: one call, one first answer.

    On a generation failure the conversation and the user message are kept, and the raised
    ChatError carries the exchange (its conversation is `exchange.user_message.conversation`).
    """
    conversation = create_conversation(owner=owner, title=title, system_prompt=system_prompt)
    return conversation, post_message(conversation=conversation, content=content)


def _save_failed_reply(conversation, engine, params, *, reason: str) -> Message:
    with transaction.atomic():
        reply = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            content="",
            status=Message.Status.ERROR,
            error=reason,
            model=engine.model_name,
            generation_params=params.as_dict(),
        )
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=reply.created_at)
    return reply
