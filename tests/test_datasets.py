"""Fine-tuning datasets (JSON Lines) exported from the admin: of chosen conversations, and of
chosen messages by their conversation; every turn, or up to the last rated-up reply. Also that
they are streamed, in one query however many conversations there are."""

import json
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.http import StreamingHttpResponse
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import services
from conversations.datasets import dataset_lines
from conversations.models import Conversation, Message
from tests.factories import make_conversation

pytestmark = pytest.mark.django_db

CONVERSATIONS = "/admin/conversations/conversation/"
MESSAGES = "/admin/conversations/message/"
EVERY_TURN = "export_dataset"
RATED_UP = "export_rated_up_dataset"
ATTACHMENT = re.compile(r'^attachment; filename="chat-dataset-\d{8}-\d{6}\.jsonl"$')
UP, DOWN = Message.Rating.UP, Message.Rating.DOWN


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


class Builder:
    """Messages of conversations as the services store them, one second apart in the order
    they are added."""

    def __init__(self):
        self.start = timezone.now() - timedelta(hours=1)
        self.added = 0

    def add(self, conversation, role, content="", **fields) -> Message:
        self.added += 1
        return Message.objects.create(
            conversation=conversation,
            role=role,
            content=content,
            created_at=self.start + timedelta(seconds=self.added),
            **fields,
        )

    def exchange(self, conversation, question, reply, **reply_fields) -> tuple[Message, Message]:
        asked = self.add(conversation, "user", question)
        answer = self.add(
            conversation,
            "assistant",
            reply,
            reply_to=asked,
            version_group=asked.pk,
            **reply_fields,
        )
        return asked, answer


@pytest.fixture
def chats(owner, other_user):
    """Three conversations:

    trip (a system prompt, French): its first reply regenerated (the older version, rated
    down, no longer chosen), rated up; a failed reply; a stopped one; an unrated last reply.
    maths (no system prompt): a question edited (the older version and its reply no longer
    chosen); a reply rated up, then one rated down.
    failed (another owner's): a reply failed, and a message without text has one.
    """
    build = Builder()
    trip = services.create_conversation(owner=owner, title="Trip", system_prompt="Réponds bref.")
    maths = services.create_conversation(owner=owner, title="Maths", system_prompt="")
    failed = services.create_conversation(owner=other_user, title="Failed")

    station = build.add(trip, "user", "Où est la gare ? 🚉")
    build.add(
        trip,
        "assistant",
        "Je ne sais pas.",
        reply_to=station,
        version_group=station.pk,
        is_active=False,
        rating=DOWN,
    )
    build.add(
        trip,
        "assistant",
        "Tout droit, puis à gauche — 200 m.",
        reply_to=station,
        version_group=station.pk,
        rating=UP,
    )
    build.exchange(trip, "And the museum?", "", status="error", error="RuntimeError: boom")
    build.exchange(trip, "Tell me a story", "Once upon a", status="cancelled")
    build.exchange(trip, "Merci !", "De rien.")

    typo = build.add(maths, "user", "2+2=?", is_active=False)
    build.add(maths, "assistant", "5", reply_to=typo, version_group=typo.pk)
    build.add(maths, "user", "2+2?", version_group=typo.version_group)
    build.add(maths, "assistant", "4", rating=UP)  # stored without reply_to: answers "2+2?"
    build.exchange(maths, "3+3?", "7", rating=DOWN)

    build.exchange(failed, "Hello?", "", status="error", error="RuntimeError: no model")
    build.exchange(failed, "", "An answer to nothing.")
    return trip, maths, failed


TRIP = [
    system("Réponds bref."),
    user("Où est la gare ? 🚉"),
    assistant("Tout droit, puis à gauche — 200 m."),
    user("Merci !"),
    assistant("De rien."),
]
MATHS = [user("2+2?"), assistant("4"), user("3+3?"), assistant("7")]


def export(client, url, action, selected, **data) -> list[dict]:
    """POST the changelist's `action` on the `selected` rows; the lines of the file it sends,
    each read as JSON, in an order that does not depend on the database's."""
    ids = [str(obj.pk) for obj in selected]
    response = client.post(url, {"action": action, "_selected_action": ids, **data})
    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "application/x-ndjson"
    assert ATTACHMENT.match(response["Content-Disposition"])
    body = b"".join(response.streaming_content)
    assert body == b"" or body.endswith(b"\n")
    return in_order(json.loads(line) for line in body.decode("utf-8").split("\n")[:-1])


def dataset(*chats) -> list[dict]:
    return in_order({"messages": chat} for chat in chats)


def in_order(lines) -> list[dict]:
    """Lines sorted by their text: a dataset gives them in the order of its conversations'
    ids, which are random."""
    return sorted(lines, key=json.dumps)


def test_conversations_export_every_kept_turn(admin_client, chats):
    lines = export(admin_client, CONVERSATIONS, EVERY_TURN, chats)

    assert lines == dataset(TRIP, MATHS)


def test_conversations_export_only_those_selected(admin_client, chats):
    _, maths, failed = chats

    assert export(admin_client, CONVERSATIONS, EVERY_TURN, [maths, failed]) == dataset(MATHS)
    assert export(admin_client, CONVERSATIONS, EVERY_TURN, [failed]) == []


def test_conversations_export_rated_up_replies_only(admin_client, chats):
    lines = export(admin_client, CONVERSATIONS, RATED_UP, chats)

    # trip is cut after its rated-up reply (its older version's down vote, on a reply no longer
    # chosen, does not count); maths has a reply rated down.
    assert lines == dataset(TRIP[:3])


def test_unicode_is_written_as_text(admin_client, chats):
    trip, _, _ = chats
    response = admin_client.post(
        CONVERSATIONS, {"action": EVERY_TURN, "_selected_action": [str(trip.pk)]}
    )

    body = b"".join(response.streaming_content)

    assert "Où est la gare ? 🚉".encode() in body
    assert b"\\u" not in body


def test_message_log_exports_the_selected_messages_by_conversation(admin_client, chats):
    trip, maths, _ = chats
    # All of trip but the question "Merci !" (its reply then has none), and maths's last turn.
    selected = [
        *trip.messages.exclude(content="Merci !"),
        *maths.messages.filter(content__in=["3+3?", "7"]),
    ]

    lines = export(admin_client, MESSAGES, EVERY_TURN, selected)

    assert lines == dataset(TRIP[:3], [user("3+3?"), assistant("7")])


def test_message_log_rated_up_only_counts_the_selected_replies(admin_client, chats):
    trip, maths, _ = chats
    # maths without its turn rated down.
    selected = [*trip.messages.all(), *maths.messages.exclude(content__in=["3+3?", "7"])]

    lines = export(admin_client, MESSAGES, RATED_UP, selected)

    assert lines == dataset(TRIP[:3], MATHS[:2])


def test_message_log_exports_a_filtered_log(admin_client, chats):
    _, maths, _ = chats
    one = maths.messages.first()

    # "Select all" of the log searched for the conversation's title: every message it lists.
    lines = export(admin_client, f"{MESSAGES}?q=Maths", EVERY_TURN, [one], select_across="1")

    assert lines == dataset(MATHS)


def queries_for_conversations(owner, count: int, tag: str) -> tuple[int, int]:
    """The queries that reading the whole dataset of `count` new conversations takes, and the
    lines it gives."""
    for i in range(count):
        make_conversation(owner, tag, texts=[f"{tag} question {i}", "answer", "more?", "more."])
    conversations = Conversation.objects.filter(title=tag)
    with CaptureQueriesContext(connection) as context:
        lines = list(dataset_lines(conversations=conversations))
    return len(context.captured_queries), len(lines)


def test_query_count_does_not_grow_with_conversations(owner):
    few = queries_for_conversations(owner, 2, "few")
    many = queries_for_conversations(owner, 20, "many")

    assert few == (1, 2)
    assert many == (1, 20)


def test_a_large_export_is_streamed_line_by_line(admin_client, owner):
    conversations = [
        services.create_conversation(owner=owner, title=f"Chat {i}", system_prompt="Be kind.")
        for i in range(50)
    ]
    start = timezone.now() - timedelta(days=1)
    # 2,000 messages, 40 a conversation: more than one chunk of rows.
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role="user" if turn % 2 == 0 else "assistant",
            content=f"{conversation.title}, message {turn}",
            created_at=start + timedelta(seconds=turn),
        )
        for conversation in conversations
        for turn in range(40)
    )

    response = admin_client.post(
        CONVERSATIONS,
        {"action": EVERY_TURN, "_selected_action": [str(conversations[0].pk)], "select_across": 1},
    )

    assert isinstance(response, StreamingHttpResponse)
    chunks = list(response.streaming_content)
    assert len(chunks) == 50  # one a conversation, sent as each is read
    lines = [json.loads(chunk) for chunk in chunks]
    assert all(len(line["messages"]) == 41 for line in lines)
    chat = next(
        line["messages"] for line in lines if line["messages"][1] == user("Chat 7, message 0")
    )
    assert chat[:3] == [
        system("Be kind."),
        user("Chat 7, message 0"),
        assistant("Chat 7, message 1"),
    ]
    assert chat[-1] == assistant("Chat 7, message 39")
