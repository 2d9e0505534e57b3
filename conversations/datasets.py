"""Conversations as a fine-tuning dataset: JSON Lines, one conversation a line, in the chat
messages form that fine-tuning tools read:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."}, {"role": "assistant", "content": "..."},
                  ...]}

What a line holds:

- the conversation's system prompt first, as a system message, if it has one;
- then the chosen versions of its turns (the active path, as the thread shows them), oldest
  first, as exchanges: a user message and the reply that follows it. An exchange is kept only if
  both have text and the reply finished (status ok); a question whose reply failed, was stopped,
  was interrupted or is still being written is left out together with its reply. A user message
  followed by another user message, a reply with no user message before it, and a reply that
  answers (`reply_to`) another message than the one before it are left out too. So a line
  alternates user and assistant and ends with a reply;
- a conversation with no exchange kept gives no line.

Rated-up replies only (`rated_up_only`): a conversation gives a line only if at least one of the
replies kept in it is rated up and none of them is rated down; its line is cut after its last
rated-up reply, so the unrated exchanges before it stay (the conversation that led to it) and
those after it go. Ratings of replies left out (failed ones, other versions)
count for nothing.

Messages chosen one by one (the admin's message log) are exported by their conversation with the
same rules, only those messages: a reply chosen without its question has none, and is left out.

The lines are generated while they are sent: messages are read in one query, in chunks, so the
number of queries stays one, and memory holds a chunk and one conversation, however many are
exported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import groupby
from operator import itemgetter

from django.db.models import F, QuerySet
from django.http import StreamingHttpResponse
from django.utils import timezone

from .models import Message

# No media type for JSON Lines is registered; application/x-ndjson is the one in use (for the
# same format: one JSON value a line, UTF-8), which tools that read such streams recognize. The
# `.jsonl` of the file name is what fine-tuning tools look for.
CONTENT_TYPE = "application/x-ndjson"
# Rows fetched at a time: what the export holds in memory at most, besides one conversation.
CHUNK_ROWS = 1000
DIALOGUE_ROLES = [Message.Role.USER, Message.Role.ASSISTANT]


def dataset_download(chosen: QuerySet, *, rated_up_only: bool = False) -> StreamingHttpResponse:
    """The dataset of the `chosen` conversations, or of the chosen messages by their
    conversation (a queryset of either), as a file to download, written as it is sent."""
    source = "messages" if chosen.model is Message else "conversations"
    lines = dataset_lines(**{source: chosen}, rated_up_only=rated_up_only)
    response = StreamingHttpResponse(lines, content_type=CONTENT_TYPE)
    stamp = timezone.localtime().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="chat-dataset-{stamp}.jsonl"'
    return response


def dataset_lines(
    *,
    conversations: QuerySet | None = None,
    messages: QuerySet | None = None,
    rated_up_only: bool = False,
) -> Iterator[str]:
    """The lines of the dataset (see the module's docstring), each ending in a newline: one for
    each of `conversations` (a queryset of Conversation) that gives one, or, given `messages`
    (a queryset of Message), for the conversations of those messages, built of those messages
    only. Given both, the messages of those conversations; given neither, every conversation."""
    rows = Message.objects.all() if messages is None else messages
    if conversations is not None:
        rows = rows.filter(conversation__in=conversations)
    rows = (
        rows.active_path()
        .filter(role__in=DIALOGUE_ROLES)
        # By the column, not "conversation": that would sort by the conversation's own ordering.
        .order_by("conversation_id", "created_at", "id")
        # The system prompt joined to every row rather than read per conversation: the number
        # of queries stays one, however many conversations there are.
        .values(
            "conversation_id",
            "id",
            "role",
            "content",
            "status",
            "reply_to_id",
            "rating",
            system_prompt=F("conversation__system_prompt"),
        )
        .iterator(chunk_size=CHUNK_ROWS)
    )
    for _, conversation_rows in groupby(rows, key=itemgetter("conversation_id")):
        group = list(conversation_rows)
        exchanges = _exchanges(group)
        if rated_up_only:
            exchanges = _up_to_last_rated_up(exchanges)
        if not exchanges:
            continue
        system_prompt = group[0]["system_prompt"]
        chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for question, reply in exchanges:
            chat.append({"role": "user", "content": question["content"]})
            chat.append({"role": "assistant", "content": reply["content"]})
        yield json.dumps({"messages": chat}, ensure_ascii=False) + "\n"


def _exchanges(rows: Iterable[dict]) -> list[tuple[dict, dict]]:
    """The (question, reply) pairs of one conversation's rows that a line keeps."""
    exchanges = []
    question = None
    for row in rows:
        if row["role"] == Message.Role.USER:
            question = row  # the one before it, if any, had no reply
            continue
        if question is not None and _answers(row, question):
            exchanges.append((question, row))
        # A reply ends its question's turn whether it is kept or not: a later reply (another
        # turn that lost its question) must not be taken for its answer.
        question = None
    return exchanges


def _answers(reply: dict, question: dict) -> bool:
    return (
        reply["status"] == Message.Status.OK
        and bool(reply["content"])
        and bool(question["content"])
        # A reply stored without `reply_to` is taken to answer the message before it.
        and reply["reply_to_id"] in (None, question["id"])
    )


def _up_to_last_rated_up(exchanges: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """The exchanges up to the last one whose reply is rated up, or none if no reply is rated
    up or any is rated down (see the module's docstring)."""
    ratings = [reply["rating"] for _, reply in exchanges]
    if Message.Rating.DOWN in ratings or Message.Rating.UP not in ratings:
        return []
    last_up = len(ratings) - 1 - ratings[::-1].index(Message.Rating.UP)
    return exchanges[: last_up + 1]
