"""What the tests build and read again: conversations with their messages, the URLs and
snapshots they check, and the reading of streamed replies (server-sent events)."""

import json
from datetime import timedelta
from unittest import mock

from django.db import connection
from django.utils import timezone

from conversations import leases, services
from conversations.models import Conversation, Message

# The reply statistics the API promises, as listed in the README.
REPLY_STATS = set("model prompt_tokens completion_tokens ttft_ms total_ms context_turns".split())
# What the API gives of a conversation (and a search result, a `snippet` besides).
CONVERSATION_FIELDS = set(
    "id title system_prompt temperature max_new_tokens created_at updated_at message_count".split()
)

SSE = "text/event-stream"
SCRIPTED = "one two three four five six seven eight"


# --- conversations and messages -----------------------------------------------------------------


def make_conversation(
    user,
    title="",
    *,
    messages=0,
    texts=(),
    updated_at=None,
    system_prompt=None,
    **params,
) -> Conversation:
    """A conversation of `user`, made as the service makes one (`system_prompt` None for the
    server's default, `params` its generation parameters), holding `texts` as alternating
    user and assistant turns, or else `messages` turns "<title> message <i>", all written a
    day ago; `updated_at`, if given, set last."""
    conversation = services.create_conversation(
        owner=user, title=title, system_prompt=system_prompt, **params
    )
    if not texts:
        texts = [" ".join(filter(None, (title, f"message {i}"))) for i in range(messages)]
    start = timezone.now() - timedelta(days=1)
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT,
            content=text,
            created_at=start + timedelta(seconds=i),
        )
        for i, text in enumerate(texts)
    )
    if updated_at is not None:
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=updated_at)
        conversation.refresh_from_db()
    return conversation


def add_streaming_reply(conversation, **fields) -> Message:
    """A question and a reply to it still being written, with some text (by a live writer:
    `fields` may say otherwise, and give other text)."""
    question = Message.objects.create(conversation=conversation, role="user", content="Q")
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        status=Message.Status.STREAMING,
        reply_to=question,
        version_group=question.pk,
        **{"content": "half an ans", "lease_renewed_at": timezone.now(), **fields},
    )


def snapshot(conversation) -> tuple:
    """Everything about a conversation a request could change."""
    conversation = Conversation.objects.get(pk=conversation.pk)
    rows = list(
        conversation.messages.order_by("created_at").values_list(
            "id", "role", "content", "status", "rating", "feedback"
        )
    )
    return (
        conversation.owner_id,
        conversation.title,
        conversation.system_prompt,
        conversation.updated_at,
        rows,
    )


# --- the API -------------------------------------------------------------------------------------


def url(conversation, action: str = "messages") -> str:
    return f"/api/conversations/{conversation.pk}/{action}/"


def messages_url(conversation) -> str:
    return url(conversation, "messages")


def detail_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/"


def assert_detail(response, status: int) -> str:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    return detail


def assert_409(response) -> str:
    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert detail
    return detail


def post(api, conversation, content: str):
    response = api.post(url(conversation), {"content": content}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def listed(api, conversation, include: str | None = None) -> list[dict]:
    params = {"include": include} if include else {}
    response = api.get(url(conversation), params)
    assert response.status_code == 200
    return response.json()["results"]


# --- streamed replies ----------------------------------------------------------------------------


def parse_block(block: str) -> tuple[str, object]:
    kind, data = None, []
    for line in block.split("\n"):
        if line.startswith("event:"):
            kind = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].lstrip())
    assert kind is not None, block
    return kind, json.loads("\n".join(data))


def parse_events(raw: bytes) -> list[tuple[str, object]]:
    """`event:`/`data:` blocks, separated by blank lines, as (kind, decoded data) pairs."""
    return [parse_block(block) for block in raw.decode().split("\n\n") if block.strip()]


class EventReader:
    """Reads a streaming response one event at a time, so a test can act between events."""

    def __init__(self, response) -> None:
        self.chunks = iter(response.streaming_content)
        self.buffer = ""

    def next(self) -> tuple[str, object]:
        while "\n\n" not in self.buffer:
            self.buffer += next(self.chunks).decode()
        block, self.buffer = self.buffer.split("\n\n", 1)
        return parse_block(block)

    def until(self, kind: str) -> tuple[str, object]:
        while True:
            event = self.next()
            if event[0] == kind:
                return event

    def rest(self) -> list[tuple[str, object]]:
        raw = self.buffer.encode() + b"".join(self.chunks)
        self.buffer = ""
        return parse_events(raw)


def close_stream(response) -> None:
    """Close a streamed response before its end, as a client going away does: the view's
    stream is closed and `request_finished` sent. That signal closes a database connection in
    the middle of a transaction, here the test's own: Django's test client holds it back for a
    response read to its end (and SQLite's in-memory test database ignores it); the test's
    connection is kept here too, so the test goes on in its transaction on any database."""
    with mock.patch.object(connection, "close_if_unusable_or_obsolete"):
        response.close()


def kinds(events) -> list[str]:
    return [kind for kind, _ in events]


def assert_is_stream(response) -> None:
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith(SSE)


def stream_post(api, path, data=None, *, how="accept"):
    """POST asking for SSE, by Accept header or by `"stream": true` in the body."""
    data = dict(data or {})
    if how == "accept":
        return api.post(path, data, format="json", HTTP_ACCEPT=SSE)
    return api.post(path, {**data, "stream": True}, format="json")


def stream_saving_every_piece(api, owner, fake_engine, monkeypatch):
    """A conversation and a reader of its reply of SCRIPTED words, each saved as it comes,
    after the first word."""
    monkeypatch.setattr(leases, "FLUSH_SECONDS", 0)
    conversation = make_conversation(owner, "Chat")
    fake_engine.replies = [SCRIPTED]
    reader = EventReader(stream_post(api, url(conversation), {"content": "Count"}))
    assert reader.until("delta") == ("delta", {"text": "one"})
    return conversation, reader
