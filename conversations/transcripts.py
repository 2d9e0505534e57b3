"""Chats that a program sends whole at every turn (OpenAI's chat completions, which keep no
state): which stored conversation a call continues.

A call continues a conversation when that conversation came with the same API key and its
turns as they stand (system prompt, then the user's and the assistant's messages on the active
path that the model sees again) are exactly the call's messages before its last one. Texts are
compared without the whitespace at their ends; empty messages are left out. A digest of those
turns, kept on the conversation after each reply, finds the candidates; the turns themselves
are compared before one is taken, so a conversation changed since (in the web UI, say) is not.
Anything else, an earlier message edited or left out included, starts a new conversation that
holds the call's earlier turns as given.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from .context import SEEN_STATUSES
from .llm.interface import ChatMessage
from .models import Conversation, Message

Turns = list[tuple[str, str]]  # (role, text), oldest first


def normalized(messages: list[ChatMessage]) -> Turns:
    return [(m["role"], m["content"].strip()) for m in messages if m["content"].strip()]


def digest(system_prompt: str, turns: Turns) -> str:
    document = json.dumps([system_prompt.strip(), turns], ensure_ascii=False)
    return hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()


def path_messages(
    conversation: Conversation, *, before: Message | None = None
) -> list[ChatMessage]:
    """The conversation's user and assistant messages that the model sees again (active path,
    written replies), those before `before` if given, in one query."""
    rows = conversation.messages.active_path().filter(
        status__in=SEEN_STATUSES, role__in=[Message.Role.USER, Message.Role.ASSISTANT]
    )
    if before is not None:
        rows = rows.filter(created_at__lt=before.created_at)
    return [
        {"role": role, "content": content}
        for role, content in rows.order_by("created_at").values_list("role", "content")
    ]


def stored_turns(conversation: Conversation) -> Turns:
    """The conversation's turns as a resent chat is compared with them."""
    return normalized(path_messages(conversation))


def find_continued(
    *, owner, api_key, system_prompt: str, earlier: list[ChatMessage]
) -> Conversation | None:
    """The conversation of `owner`, sent with `api_key`, whose turns are `earlier`."""
    turns = normalized(earlier)
    if not turns:  # a first message starts a conversation
        return None
    candidates = Conversation.objects.owned_by(owner).filter(
        api_key=api_key, transcript_digest=digest(system_prompt, turns)
    )
    for conversation in candidates.order_by("-updated_at")[:5]:
        if conversation.system_prompt.strip() == system_prompt.strip() and (
            stored_turns(conversation) == turns
        ):
            return conversation
    return None


def last_turn(conversation: Conversation):
    """The id of the last message on the conversation's active path."""
    return (
        conversation.messages.active_path().order_by("-created_at").values_list("pk", flat=True)
    ).first()


def remember(conversation: Conversation) -> None:
    """Keep the digest of the conversation's turns as they stand now (after a reply)."""
    value = digest(conversation.system_prompt, stored_turns(conversation))
    Conversation.objects.filter(pk=conversation.pk).update(transcript_digest=value)
    conversation.transcript_digest = value


def store_turns(conversation: Conversation, messages: list[ChatMessage]) -> list[Message]:
    """Store a new conversation's earlier turns as the program gave them: an assistant
    message right after a user message as the reply to it (one more in a row stands alone).
    Their times are a microsecond apart, just before now, so that they come before the message
    that follows them."""
    start = timezone.now() - timedelta(microseconds=len(messages) + 1)
    question: Message | None = None
    rows = []
    for i, message in enumerate(messages):
        row = Message(
            conversation=conversation,
            role=message["role"],
            content=message["content"],
            created_at=start + timedelta(microseconds=i),
        )
        if message["role"] == Message.Role.USER:
            question = row
        elif question is not None:
            row.reply_to, row.version_group = question, question.pk
            question = None
        rows.append(row)
    with transaction.atomic(savepoint=False):
        return Message.objects.bulk_create(rows)
