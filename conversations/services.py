"""Use cases. Views, the API and management commands call these and nothing below them.

Rows are written in short transactions; generation, the slow part, runs outside any transaction,
so a user message that was accepted is stored whatever happens while the model writes.

Answering returns a ReplyWriter: iterate it to stream the reply (ReplyEvents), or call `run()`
to wait for the whole of it.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from . import leases, quotas, transcripts
from .context import RecordedContext, recorded_context
from .errors import Conflict, InvalidInput, TooManyReplies
from .llm.interface import ChatMessage, FinishReason
from .models import Conversation, Message
from .replies import EventKind, Exchange, ReplyEvent, ReplyWriter, reserve_reply
from .runtime import default_generation_params, get_engine
from .validators import clean_title

logger = logging.getLogger(__name__)

TITLE_LENGTH = 60
TITLE_MAX_WORDS = 8
TITLE_PROMPT = (
    "Write a title of at most five words for a conversation that starts with this message:"
    "\n\n{message}\n\nAnswer with the title only."
)


def served_models() -> list[str]:
    """The names of the models replies are written with: the engine's one (none while an
    inference server that names no model in the settings cannot be asked)."""
    name = get_engine().model_name
    return [name] if name else []


def fallback_title(content: str) -> str:
    """A title from the first user message: its first line, cut at a word boundary."""
    line = clean_title(content.strip().split("\n", 1)[0])
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[:TITLE_LENGTH].rsplit(" ", 1)[0] or line[:TITLE_LENGTH]
    return cut.rstrip(" ,.;:") + "…"


def system_prompt_or_default(system_prompt: str | None) -> str:
    """The system prompt to store for `system_prompt` as given by a person or a program: None
    (left out, or null) is the server's default, CHATBOT_SYSTEM_PROMPT; an empty string is no
    system prompt; any other text is itself. The default is stored as text, so a conversation
    shows exactly what the model is told. Pages, the API and imports all mean this."""
    return settings.CHATBOT_SYSTEM_PROMPT if system_prompt is None else system_prompt


def create_conversation(
    *, owner, title: str = "", system_prompt: str | None = None, **params
) -> Conversation:
    """A new, empty conversation. `system_prompt`: None for the server's default, "" for none
    (see system_prompt_or_default)."""
    system_prompt = system_prompt_or_default(system_prompt)
    quotas.check_room(owner=owner, new_conversation=True, texts=(system_prompt,))
    return Conversation.objects.create(
        owner=owner, title=title.strip(), system_prompt=system_prompt, **params
    )


def update_conversation(*, conversation: Conversation, **changes) -> Conversation:
    """Change what is given of a conversation's title, system prompt, temperature and reply
    budget (`max_new_tokens`); what is not given stays. A system prompt of None restores the
    server's default and "" means none, as when a conversation is created; a temperature or
    budget of None follows the server's default at every reply."""
    unknown = set(changes) - set(Conversation.SETTINGS_FIELDS)
    if unknown:
        raise TypeError(f"Not a conversation setting: {', '.join(sorted(unknown))}")
    if "system_prompt" in changes:
        changes["system_prompt"] = system_prompt_or_default(changes["system_prompt"])
    for field, value in changes.items():
        setattr(conversation, field, value)
    conversation.save(update_fields=list(changes))
    return conversation


def generation_params(conversation: Conversation, overrides: dict | None = None):
    """The server's defaults, with this conversation's own choices on top, and a request's
    own (`overrides`: GenerationParams fields, for one reply) on top of those."""
    params = default_generation_params()
    chosen = {
        "temperature": conversation.temperature,
        "max_new_tokens": conversation.max_new_tokens,
        **(overrides or {}),
    }
    params = dataclasses.replace(params, **{k: v for k, v in chosen.items() if v is not None})
    # A budget stored before the ceiling was lowered (or imported) is cut to it, not refused.
    limit = settings.CHATBOT_MAX_NEW_TOKENS_LIMIT
    return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, limit))


def post_message(*, conversation: Conversation, content: str) -> Exchange:
    """Store the user's message, have the model answer it, store the answer.

    Raises GenerationFailed (or ContextOverflow) after saving both the user message and a reply
    with status error and the reason; the exception carries the saved exchange.
    """
    return open_message_stream(conversation=conversation, content=content).run()


def open_message_stream(
    *, conversation: Conversation, content: str, overrides: dict | None = None, labels=None
) -> ReplyWriter:
    """Store the user's message now; the returned writer answers it as it is iterated.
    `overrides`: generation parameters for this reply only (see generation_params); `labels`:
    what to keep with them."""
    with transaction.atomic():
        _ensure_idle(conversation)
        question = _save_user_message(conversation, content)
        return _writer(
            conversation, question, new_question=True, overrides=overrides, labels=labels
        )


def continue_transcript(
    *,
    owner,
    api_key,
    system_prompt: str,
    messages: list[ChatMessage],
    overrides: dict | None = None,
    labels: dict | None = None,
) -> ReplyWriter:
    """Answer the last of `messages` (a user message), sent whole with the turns before it by a
    program that keeps no state (OpenAI's chat completions). Stored in the conversation these
    turns continue, or in a new one that holds them as given (transcripts.py says which)."""
    *earlier, question = messages
    with transaction.atomic():
        conversation = transcripts.find_continued(
            owner=owner, api_key=api_key, system_prompt=system_prompt, earlier=earlier
        )
        if conversation is None:
            conversation = _program_conversation(owner, api_key, system_prompt, messages)
            if earlier:
                add_messages(conversation=conversation, messages=earlier)
        return open_message_stream(
            conversation=conversation,
            content=question["content"],
            overrides=overrides,
            labels=labels,
        )


def start_conversation(
    *, owner, content: str, title: str = "", system_prompt: str | None = None
) -> tuple[Conversation, Exchange]:
    """A new conversation with its first message answered: one call, one first answer.

    On a generation failure the conversation and the user message are kept, and the raised
    ChatError carries the exchange (its conversation is `exchange.user_message.conversation`).
    """
    writer = open_new_conversation(
        owner=owner, content=content, title=title, system_prompt=system_prompt
    )
    return writer.conversation, writer.run()


def open_new_conversation(
    *, owner, content: str, title: str = "", system_prompt: str | None = None
) -> ReplyWriter:
    """A new conversation with its first message stored; the returned writer answers it. A
    message refused (the user has too many replies being written) leaves no empty conversation."""
    with transaction.atomic():
        conversation = create_conversation(owner=owner, title=title, system_prompt=system_prompt)
        return open_message_stream(conversation=conversation, content=content)


def answer_items(
    *,
    owner,
    api_key,
    items: list[ChatMessage],
    after: Message | None = None,
    conversation: Conversation | None = None,
    system_prompt: str | None = None,
    overrides: dict | None = None,
    labels: dict | None = None,
) -> ReplyWriter:
    """Store `items` (user and assistant messages, the last the user's) and answer the last
    (OpenAI's responses): after the reply `after` (the conversation goes on from it; if turns
    followed it there, a new conversation copies the turns up to it and goes on instead), in
    `conversation`, or in a new conversation. A `system_prompt` given becomes the
    conversation's."""
    *earlier, question = items
    with transaction.atomic():
        if after is not None:
            conversation = after.conversation
            if transcripts.last_turn(conversation) != after.pk:
                conversation = _copy_up_to(after)
        if conversation is None:
            conversation = _program_conversation(owner, api_key, system_prompt or "", items)
        elif system_prompt is not None and system_prompt != conversation.system_prompt:
            update_conversation(conversation=conversation, system_prompt=system_prompt)
        if earlier:
            add_messages(conversation=conversation, messages=earlier)
        return open_message_stream(
            conversation=conversation,
            content=question["content"],
            overrides=overrides,
            labels=labels,
        )


def _program_conversation(owner, api_key, system_prompt: str, messages) -> Conversation:
    """A new conversation sent through OpenAI's API with `api_key`, titled by its first user
    message among `messages`."""
    first = next(m["content"] for m in messages if m["role"] == Message.Role.USER)
    return create_conversation(
        owner=owner, title=fallback_title(first), system_prompt=system_prompt, api_key=api_key
    )


def _copy_up_to(reply: Message) -> Conversation:
    """A new conversation of the same owner holding `reply`'s conversation's turns up to it."""
    source = reply.conversation
    # (The reply itself may be a version set aside since: it is taken as it is.)
    earlier = transcripts.path_messages(source, before=reply)
    turns = [
        m
        for m in [*earlier, {"role": reply.role, "content": reply.content}]
        if m["content"].strip()
    ]
    copy = create_conversation(
        owner=source.owner,
        title=source.title,
        system_prompt=source.system_prompt,
        api_key=source.api_key,
    )
    add_messages(conversation=copy, messages=turns)
    return copy


def regenerate(*, conversation: Conversation) -> ReplyWriter:
    """A new version of the last reply. The earlier versions are kept, inactive."""
    with transaction.atomic():
        _ensure_idle(conversation)
        question = _last_question(conversation)
        if question is None:
            raise Conflict("There is no message to answer again yet.")
        return _writer(conversation, question)


def edit_last_message(*, conversation: Conversation, content: str) -> ReplyWriter:
    """Replace the last user message with a new version and answer it. The earlier version and
    its replies are kept, inactive, and can be switched back to."""
    with transaction.atomic():
        _ensure_idle(conversation)
        previous = _last_question(conversation)
        if previous is None:
            raise Conflict("There is no message to edit yet.")
        Message.objects.filter(version_group=previous.version_group).update(is_active=False)
        question = _save_user_message(conversation, content, version_group=previous.version_group)
        return _writer(conversation, question, new_question=True)


def activate_version(*, conversation: Conversation, message: Message) -> Message:
    """Make `message` the chosen version among its siblings. Only the last exchange can switch:
    the turns after an earlier exchange were written from the version that was active then."""
    question = _last_question(conversation)
    in_last_exchange = question is not None and (
        message.version_group == question.version_group
        or (message.role == Message.Role.ASSISTANT and message.reply_to_id == question.pk)
    )
    if not in_last_exchange:
        raise Conflict("Only the versions of the last message and its reply can be switched.")
    if message.status == Message.Status.STREAMING:
        if not interrupt_dead_replies(conversation=conversation):
            raise Conflict("This reply is still being written.")
        message.refresh_from_db(fields=["status", "error"])
    with transaction.atomic():
        Message.objects.filter(version_group=message.version_group).exclude(pk=message.pk).update(
            is_active=False
        )
        Message.objects.filter(pk=message.pk).update(is_active=True)
    message.is_active = True
    return message


def recent_conversations(*, owner, limit: int) -> list[dict]:
    """`owner`'s `limit` most recently active conversations, newest first: {"id", "title"}
    (one query, no counts: the thread page's sidebar)."""
    rows = Conversation.objects.owned_by(owner).order_by("-updated_at").values("id", "title")
    return list(rows[:limit])


USAGE_DAYS = 14  # the days the usage page and GET /api/usage/ list


def token_usage(*, owner) -> tuple[quotas.TokenUsage, list]:
    """`owner`'s tokens today against their daily quota, and their last USAGE_DAYS days
    (day, tokens, replies), newest first."""
    return quotas.token_usage(owner.pk), quotas.daily_tokens(owner.pk, USAGE_DAYS)


def reply_context(*, reply: Message) -> RecordedContext | None:
    """What the model read to write `reply`: the system prompt, the stored messages kept and
    how many older ones were dropped for room (None for a reply that kept no record)."""
    return recorded_context(reply)


def rate_reply(*, reply: Message, rating: int | None, feedback: str | None = None) -> Message:
    """Keep its owner's thumbs up (Message.Rating.UP) or down on a reply, with a comment if
    they gave one; a rating of None takes both back. Only replies are rated."""
    if reply.role != Message.Role.ASSISTANT:
        raise InvalidInput("Only the model's replies can be rated, not your own messages.")
    if rating is not None and rating not in Message.Rating.values:
        raise InvalidInput("A rating is thumbs up or thumbs down.")
    feedback = (feedback or "").strip()
    if len(feedback) > Message.MAX_FEEDBACK_CHARS:
        raise InvalidInput(
            f"Keep the comment under {Message.MAX_FEEDBACK_CHARS} characters "
            f"({len(feedback)} given)."
        )
    if rating is None:
        feedback = ""
    reply.rating, reply.feedback = rating, feedback or None
    reply.rated_at = timezone.now() if rating is not None else None
    reply.save(update_fields=["rating", "feedback", "rated_at"])
    return reply


def stop_generation(*, conversation: Conversation) -> bool:
    """Stop the reply being written in this conversation, if any. The partial reply is kept
    with status cancelled. True if something was running."""
    stopped_here = leases.keeper.stop_conversation(conversation.pk)
    # A reply written by another server process sees this at its next save and stops.
    marked = conversation.messages.filter(status=Message.Status.STREAMING).update(
        status=Message.Status.CANCELLED
    )
    return stopped_here or bool(marked)


def delete_conversation(*, conversation: Conversation) -> None:
    """Delete a conversation and every message in it. A reply being written in it is stopped
    first, so the model does not go on writing for a conversation that is gone."""
    stop_generation(conversation=conversation)
    conversation.delete()


def add_messages(*, conversation: Conversation, messages: list[ChatMessage]) -> list[Message]:
    """Store user and assistant messages at the end of a conversation, unanswered (OpenAI's
    conversation items). Refused while a reply is being written in it."""
    with transaction.atomic():
        _ensure_idle(conversation)
        quotas.check_room(owner=conversation.owner_id, texts=tuple(m["content"] for m in messages))
        stored = transcripts.store_turns(conversation, messages)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    return stored


def delete_messages(*, conversation: Conversation, messages) -> None:
    """Delete messages of a conversation (with the replies to them): a reply among them that
    is being written is stopped first."""
    ids = [message.pk for message in messages]
    if conversation.messages.filter(pk__in=ids, status=Message.Status.STREAMING).exists():
        stop_generation(conversation=conversation)
    conversation.messages.filter(pk__in=ids).delete()


def interrupt_dead_replies(*, conversation: Conversation | None = None) -> int:
    """Mark the replies whose server stopped writing them (their lease ran out) as interrupted,
    in one conversation or, at a server's start, in all. Their text is kept; a reply another
    server is still writing is left alone. Returns how many were marked."""
    messages = conversation.messages.all() if conversation else Message.objects.all()
    return leases.interrupt_dead_replies(messages)


# Internals


def _ensure_idle(conversation: Conversation) -> None:
    """Refuse a new reply while one is being written. Called first in the transaction that
    saves the question and reserves its reply: the conversation's row is locked (PostgreSQL;
    SQLite's write transactions are serialized anyway), so of two messages sent at the same
    time the second sees the first one's reply and gets 409."""
    if connection.features.has_select_for_update:  # (SQLite has no row locks: no query)
        list(Conversation.objects.select_for_update().filter(pk=conversation.pk).values_list("pk"))
    interrupt_dead_replies(conversation=conversation)
    if conversation.messages.filter(status=Message.Status.STREAMING).exists():
        raise Conflict(
            "A reply is still being written in this conversation. Wait for it or stop it."
        )
    _ensure_reply_allowed(conversation.owner_id)


def _ensure_reply_allowed(owner_id) -> None:
    """Refuse a new reply to a user who already has CHATBOT_REPLIES_PER_USER being written (in
    any conversation, on any server process), so that no one user holds the model. Called in
    the transaction that reserves the reply: the user's row is locked (PostgreSQL; SQLite's
    write transactions are serialized), so two messages at once cannot both take the last
    place."""
    quotas.check_tokens(owner_id)
    limit = settings.CHATBOT_REPLIES_PER_USER
    if limit <= 0:
        return
    if connection.features.has_select_for_update:
        list(get_user_model().objects.select_for_update().filter(pk=owner_id).values_list("pk"))
    theirs = Message.objects.filter(conversation__owner_id=owner_id)
    if len(leases.being_written(theirs).values_list("pk")[:limit]) >= limit:
        raise TooManyReplies(
            f"You already have {limit} replies being written, the most one user may have at "
            "once. Wait for one to finish (or stop it), then send again."
        )


def _save_user_message(conversation, content: str, *, version_group=None) -> Message:
    quotas.check_room(owner=conversation.owner_id, texts=(content,))
    now = timezone.now()
    # (Inside the caller's transaction: no savepoint of its own, two queries fewer.)
    with transaction.atomic(savepoint=False):
        message = Message.objects.create(
            conversation=conversation,
            role=Message.Role.USER,
            content=content,
            created_at=now,
            **({"version_group": version_group} if version_group else {}),
        )
        if not version_group:  # the first of its versions (see api.serializers.load_versions)
            message.version = message.versions = 1
        changes = {"updated_at": now}
        if not conversation.title:
            changes["title"] = fallback_title(content)
        Conversation.objects.filter(pk=conversation.pk).update(**changes)
    for field, value in changes.items():
        setattr(conversation, field, value)
    return message


def _last_question(conversation: Conversation) -> Message | None:
    return (
        conversation.messages.active_path()
        .filter(role=Message.Role.USER)
        .order_by("-created_at")
        .first()
    )


def _writer(
    conversation: Conversation,
    question: Message,
    *,
    new_question=False,
    overrides=None,
    labels=None,
) -> ReplyWriter:
    """The writer of the reply to `question`, whose row it reserves (inside the caller's
    transaction). A question saved just now has no earlier replies to set aside."""
    engine, params = get_engine(), generation_params(conversation, overrides)
    return ReplyWriter(
        conversation=conversation,
        question=question,
        reply=reserve_reply(
            question, engine=engine, params=params, new_question=new_question, labels=labels
        ),
        engine=engine,
        params=params,
        after_done=_after_reply,
        labels=labels or {},
    )


def _after_reply(writer: ReplyWriter) -> ReplyEvent | None:
    """After a finished reply: a conversation a program sent through OpenAI's API keeps the
    digest of its turns (transcripts.py) and the title its first message gave it (a title
    written by the model would delay the program's answer, and such clients ask for their own);
    any other may be named by the model."""
    if writer.conversation.api_key_id is not None:
        transcripts.remember(writer.conversation)
        return None
    return _write_title(writer)


def _write_title(writer: ReplyWriter) -> ReplyEvent | None:
    """After the first exchange, let the model name the conversation. The fallback title from
    the first message stays if the model's answer is not a clean, short title, or if someone
    renamed the conversation meanwhile."""
    conversation, question = writer.conversation, writer.question
    fallback = fallback_title(question.content)
    if (
        not settings.CHATBOT_AUTO_TITLE
        or writer.reply.status != Message.Status.OK
        or conversation.title != fallback
        or conversation.messages.filter(role=Message.Role.USER).count() != 1
    ):
        return None
    prompt = [{"role": "user", "content": TITLE_PROMPT.format(message=question.content[:2000])}]
    params = dataclasses.replace(default_generation_params(), max_new_tokens=16, temperature=0)
    try:
        generation = writer.engine.generate(prompt, params, owner=str(conversation.owner_id))
    except Exception:
        logger.exception("Writing a title failed; keeping %r", fallback)
        return None
    title = _clean_title(generation.text)
    if generation.finish_reason != FinishReason.STOP or not title:
        return None
    if not Conversation.objects.filter(pk=conversation.pk, title=fallback).update(title=title):
        return None
    conversation.title = title
    return ReplyEvent(EventKind.TITLE, title)


def _clean_title(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    line = re.sub(r"^(title|subject)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(" \"'*#`\u201c\u201d\u2018\u2019").rstrip(".:;,!")
    line = clean_title(line)
    if not line or len(line.split()) > TITLE_MAX_WORDS or len(line) > TITLE_LENGTH:
        return ""
    return line
