"""From the turns stored in the database to the message list the model reads.

Nothing about a conversation lives only in memory: every new message rebuilds its context here,
so a conversation picks up after a restart exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict
from uuid import UUID

from .errors import ContextOverflow
from .llm.interface import ChatEngine, ChatMessage, GenerationParams
from .models import Conversation, Message

# Replies the model sees again later: finished ones, and the part of a stopped one that was kept.
SEEN_STATUSES = [Message.Status.OK, Message.Status.CANCELLED, Message.Status.INTERRUPTED]


class StoredTurn(TypedDict):
    """An earlier message as the context is built from it."""

    id: UUID
    role: str
    content: str


class ContextRecord(TypedDict):
    """What a reply keeps of its context (Message.context)."""

    system_prompt: str
    messages: list[str]  # the ids of the earlier messages kept, oldest first
    dropped: int  # older messages left out for room


@dataclass(frozen=True)
class ModelContext:
    messages: list[ChatMessage]  # system prompt, the earlier turns kept, the new user message
    prompt_tokens: int
    context_turns: int  # earlier messages the model sees
    dropped_turns: int  # earlier messages left out for lack of room
    kept_ids: list[str]  # the earlier messages the model sees, oldest first
    system_prompt: str

    def record(self) -> ContextRecord:
        """What the reply keeps of its context (Message.context): enough to show it again
        exactly, whatever is edited or regenerated later."""
        return {
            "system_prompt": self.system_prompt,
            "messages": self.kept_ids,
            "dropped": self.dropped_turns,
        }


@dataclass(frozen=True)
class RecordedContext:
    """A reply's context as its record says, for people to read: `messages` are the stored
    messages kept, oldest first (None where one was deleted since)."""

    system_prompt: str
    dropped: int
    messages: list[Message | None]


def load_history(conversation: Conversation, *, before: Message) -> list[StoredTurn]:
    """The conversation's earlier turns on the active path (the chosen versions), oldest first,
    in one query: {"id", "role", "content"} each."""
    rows = (
        conversation.messages.active_path()
        .filter(
            created_at__lt=before.created_at,
            status__in=SEEN_STATUSES,
            role__in=[Message.Role.USER, Message.Role.ASSISTANT],
        )
        .exclude(pk=before.pk)
        .exclude(content="")
        .order_by("created_at")
        .values("id", "role", "content")
    )
    return [StoredTurn(id=r["id"], role=r["role"], content=r["content"]) for r in rows]


def group_turns(history: list[StoredTurn]) -> list[list[StoredTurn]]:
    """Split messages into turns, each a user message and the replies that followed it."""
    turns: list[list[StoredTurn]] = []
    for message in history:
        if message["role"] == Message.Role.USER or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def recorded_context(reply: Message) -> RecordedContext | None:
    """What `reply`'s model read, from its record, in one query (None: the reply has no record,
    as one written before replies kept them, or a user message)."""
    record = reply.context
    if not isinstance(record, dict):
        return None
    ids = [str(i) for i in record.get("messages", [])]
    found = {str(m.pk): m for m in Message.objects.filter(pk__in=ids)}
    return RecordedContext(
        system_prompt=record.get("system_prompt", ""),
        dropped=int(record.get("dropped", 0)),
        messages=[found.get(i) for i in ids],
    )


def build_context(
    conversation: Conversation,
    *,
    new_message: Message,
    engine: ChatEngine,
    params: GenerationParams,
) -> ModelContext:
    """The model's input for answering `new_message`.

    Keeps the system prompt, the new message and as many of the newest earlier turns as fit in
    the model's context window minus the reply budget, counted with the model's own tokenizer and
    chat template. Whole turns are dropped, oldest first.
    """
    head: list[ChatMessage] = []
    if conversation.system_prompt:
        head.append({"role": "system", "content": conversation.system_prompt})
    tail: list[ChatMessage] = [{"role": "user", "content": new_message.content}]
    turns = group_turns(load_history(conversation, before=new_message))
    budget = engine.prompt_budget(params)

    def recent(kept: int) -> list[StoredTurn]:
        return [m for turn in turns[len(turns) - kept :] for m in turn] if kept else []

    def assemble(kept: int) -> list[ChatMessage]:
        return head + [{"role": m["role"], "content": m["content"]} for m in recent(kept)] + tail

    counts: dict[int, int] = {}

    def tokens(kept: int) -> int:
        if kept not in counts:
            counts[kept] = engine.count_tokens(assemble(kept))
        return counts[kept]

    kept = len(turns)
    if tokens(kept) > budget:  # the common case, everything fits, takes one count
        if tokens(0) > budget:
            raise ContextOverflow(prompt_tokens=tokens(0), budget=budget)
        # Token counts grow with every turn kept: binary search for the most that fit.
        low, high = 0, kept - 1
        while low < high:
            mid = (low + high + 1) // 2
            if tokens(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        kept = low
    messages = assemble(kept)
    seen = len(messages) - len(head) - len(tail)
    total = sum(len(turn) for turn in turns)
    return ModelContext(
        messages=messages,
        prompt_tokens=tokens(kept),
        context_turns=seen,
        dropped_turns=total - seen,
        kept_ids=[str(m["id"]) for m in recent(kept)],
        system_prompt=conversation.system_prompt,
    )
