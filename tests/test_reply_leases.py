"""Leases on replies being written: a reply whose writer is gone frees its conversation, a live
one is never taken for dead, and a writer whose reply was given up for dead stops.

The same with real gunicorn servers whose workers are killed or frozen: test_reply_recovery.py.
"""

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import leases, services
from conversations.models import Message
from tests.factories import (
    SCRIPTED,
    add_streaming_reply,
    assert_409,
    listed,
    make_conversation,
    post,
    stream_saving_every_piece,
    url,
)

pytestmark = pytest.mark.django_db

STALE = 15


@pytest.fixture(autouse=True)
def _lease(settings):
    settings.CHATBOT_STALE_REPLY_SECONDS = STALE


def expired() -> dict:
    return {"lease_renewed_at": timezone.now() - timedelta(seconds=STALE + 1)}


def live() -> dict:
    return {"lease_renewed_at": timezone.now() - timedelta(seconds=STALE - 2)}


def answered_conversation(owner):
    """A conversation whose last reply's writer died (its lease ran out) half-way."""
    conversation = make_conversation(owner, "Chat")
    return conversation, add_streaming_reply(conversation, **expired())


@pytest.mark.parametrize(
    "action, body",
    [("messages", {"content": "More"}), ("regenerate", {}), ("edit", {"content": "Again"})],
)
def test_a_reply_whose_writer_died_does_not_block_its_conversation(
    api, owner, fake_engine, action, body
):
    conversation, dead = answered_conversation(owner)

    response = api.post(url(conversation, action), body, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["reply"]["status"] == "ok"
    dead.refresh_from_db()
    assert dead.status == Message.Status.INTERRUPTED
    assert dead.content == "half an ans", "the text written before the crash is kept"
    assert not conversation.messages.filter(status=Message.Status.STREAMING).exists()


@pytest.mark.parametrize(
    "action, body",
    [("messages", {"content": "More"}), ("regenerate", {}), ("edit", {"content": "Again"})],
)
def test_a_reply_with_a_live_lease_still_blocks(api, owner, fake_engine, action, body):
    conversation = make_conversation(owner, "Chat")
    writing = add_streaming_reply(conversation, **live())
    count = conversation.messages.count()

    assert "still being written" in assert_409(
        api.post(url(conversation, action), body, format="json")
    )

    writing.refresh_from_db()
    assert writing.status == Message.Status.STREAMING
    assert conversation.messages.count() == count


def test_the_messages_api_shows_a_dead_reply_as_interrupted(api, owner):
    conversation, _ = answered_conversation(owner)

    rows = listed(api, conversation)

    assert [(m["role"], m["status"]) for m in rows] == [
        ("user", "ok"),
        ("assistant", "interrupted"),
    ]
    assert rows[-1]["content"] == "half an ans"


def test_the_messages_api_leaves_a_live_reply_streaming(api, owner):
    conversation = make_conversation(owner, "Chat")
    add_streaming_reply(conversation, **live())

    assert listed(api, conversation)[-1]["status"] == "streaming"


def test_the_thread_page_shows_a_dead_reply_as_interrupted_and_offers_to_go_on(client, owner):
    conversation, dead = answered_conversation(owner)
    client.force_login(owner)

    page = client.get(conversation.get_absolute_url()).content.decode()

    assert "Interrupted" in page
    assert "Writing…" not in page
    assert 'action="' + url_of(conversation, "regenerate") in page, "the thread is usable again"
    dead.refresh_from_db()
    assert dead.status == Message.Status.INTERRUPTED


def url_of(conversation, name: str) -> str:
    from django.urls import reverse

    return reverse(f"conversations:{name}", args=[conversation.pk])


def test_a_dead_reply_can_be_switched_to(api, owner, fake_engine):
    conversation = make_conversation(owner, "Chat")
    post(api, conversation, "Hi")
    first = conversation.messages.get(role="assistant")
    api.post(url(conversation, "regenerate"), format="json")
    second = conversation.messages.get(role="assistant", is_active=True)
    api.post(url(conversation, "activate"), {"message": str(first.pk)}, format="json")
    Message.objects.filter(pk=second.pk).update(status=Message.Status.STREAMING, **expired())

    response = api.post(url(conversation, "activate"), {"message": str(second.pk)}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "interrupted"
    second.refresh_from_db()
    assert (second.status, second.is_active) == (Message.Status.INTERRUPTED, True)


def test_the_writer_renews_its_lease_as_it_saves(api, owner, fake_engine, monkeypatch):
    conversation, reader = stream_saving_every_piece(api, owner, fake_engine, monkeypatch)
    reply = conversation.messages.get(role="assistant")
    Message.objects.filter(pk=reply.pk).update(**expired())

    reader.next()  # the next piece of text is saved with a new lease

    reply.refresh_from_db()
    assert reply.lease_renewed_at > leases.stale_before()
    assert reply.status == Message.Status.STREAMING
    reader.rest()


@pytest.mark.parametrize("status", [Message.Status.INTERRUPTED, Message.Status.CANCELLED])
def test_a_writer_whose_reply_was_given_up_stops_and_keeps_that_status(
    api, owner, fake_engine, monkeypatch, status
):
    """A writer that stood still past its lease (a long pause, a frozen disk) finds its reply
    marked interrupted by someone else, and writes no more, as it does when stopped."""
    conversation, reader = stream_saving_every_piece(api, owner, fake_engine, monkeypatch)
    reply = conversation.messages.get(role="assistant")
    Message.objects.filter(pk=reply.pk).update(status=status)

    rest = reader.rest()

    kind, done = rest[-1]
    assert kind == "done"
    assert done["status"] == status
    assert len([k for k, _ in rest if k == "delta"]) <= 1, "the writer stopped at its next save"
    reply.refresh_from_db()
    assert reply.status == status
    assert reply.content == done["content"]
    assert SCRIPTED.startswith(reply.content) and reply.content != SCRIPTED
    assert reply.generation_params["finish_reason"] == "cancelled"
    assert not leases.keeper.stop_conversation(conversation.pk)  # nothing left running here


class Holder:
    def __init__(self, reply: Message, text: str = "") -> None:
        self.reply = reply
        self.text = text
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def keeper_holding(monkeypatch, *holders: Holder) -> leases.LeaseKeeper:
    """A keeper of its own holding `holders`, without its thread: renew() is called by hand."""
    keeper = leases.LeaseKeeper()
    monkeypatch.setattr(keeper, "_run", lambda: None)
    for holder in holders:
        keeper.hold(holder)
    return keeper


def test_the_keeper_renews_the_leases_of_replies_waiting_for_the_model(owner, monkeypatch):
    """Between two saves (a full batch ahead, a model still loading) the keeper renews."""
    conversation = make_conversation(owner, "Chat")
    waiting = Holder(add_streaming_reply(conversation, **expired()))
    stopped_elsewhere = Holder(add_streaming_reply(make_conversation(owner, "Chat"), **expired()))
    Message.objects.filter(pk=stopped_elsewhere.reply.pk).update(status="cancelled")
    keeper = keeper_holding(monkeypatch, waiting, stopped_elsewhere)

    keeper.renew()

    waiting.reply.refresh_from_db()
    assert waiting.reply.lease_renewed_at > leases.stale_before()
    assert not waiting.stopped
    assert stopped_elsewhere.stopped, "a reply stopped from another process stops here too"
    assert services.interrupt_dead_replies() == 0


def statements(queries) -> list[str]:
    """The SQL run, without the savepoints of the test's own transaction."""
    return [
        q["sql"]
        for q in queries.captured_queries
        if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))
    ]


def test_the_keeper_saves_the_text_of_every_reply_it_holds_in_one_statement(owner, monkeypatch):
    """A process writing many replies saves all their text together: one UPDATE renews the
    leases, one prepared UPDATE takes every text as a row of parameters. A reply stopped
    elsewhere is not written (its writer's last save holds all of its text) but stopped."""
    writing = [
        Holder(add_streaming_reply(make_conversation(owner, "Chat")), text=f"reply {n} so far")
        for n in range(3)
    ]
    stopped_elsewhere = Holder(add_streaming_reply(make_conversation(owner, "Chat")), "more")
    Message.objects.filter(pk=stopped_elsewhere.reply.pk).update(status="cancelled")
    keeper = keeper_holding(monkeypatch, *writing, stopped_elsewhere)

    with CaptureQueriesContext(connection) as queries:
        keeper.renew()
    leases_renewed, texts_saved, still_streaming = statements(queries)
    assert leases_renewed.startswith("UPDATE") and "lease_renewed_at" in leases_renewed
    assert texts_saved.startswith("4 times: UPDATE")  # one statement, a row for each reply
    assert still_streaming.startswith("SELECT")

    for n, holder in enumerate(writing):
        holder.reply.refresh_from_db()
        assert holder.reply.content == f"reply {n} so far"
        assert not holder.stopped
    stopped_elsewhere.reply.refresh_from_db()
    assert stopped_elsewhere.reply.content == "half an ans"
    assert stopped_elsewhere.stopped

    # Text that has not grown since is not sent again; the leases are renewed all the same.
    keeper.release(stopped_elsewhere)
    Message.objects.filter(pk=writing[0].reply.pk).update(**expired())
    with CaptureQueriesContext(connection) as queries:
        keeper.renew()
    (leases_renewed,) = statements(queries)
    assert "so far" not in leases_renewed
    writing[0].reply.refresh_from_db()
    assert writing[0].reply.lease_renewed_at > leases.stale_before()


def test_a_reply_s_first_text_is_saved_at_once_even_right_after_a_save(owner, monkeypatch):
    """The process's save of all its replies, made a moment before a reply's first piece,
    does not put off the saving of that piece: a client that has it finds it stored."""
    holder = Holder(add_streaming_reply(make_conversation(owner, "Chat"), content=""))
    keeper = keeper_holding(monkeypatch, holder)
    keeper.renew()  # (nothing written yet: only the lease)

    holder.text = "Once"
    keeper.renew_if_due(holder)

    holder.reply.refresh_from_db()
    assert holder.reply.content == "Once"
    holder.text = "Once upon"
    keeper.renew_if_due(holder)  # the next save of it waits its turn
    holder.reply.refresh_from_db()
    assert holder.reply.content == "Once"
    keeper.release(holder)


def test_the_keeper_thread_renews_on_its_own(owner, settings, monkeypatch):
    settings.CHATBOT_STALE_REPLY_SECONDS = 0.3
    keeper = leases.LeaseKeeper()
    renewed = []
    monkeypatch.setattr(keeper, "renew", lambda: renewed.append(timezone.now()))
    holder = Holder(add_streaming_reply(make_conversation(owner, "Chat")))

    keeper.hold(holder)
    deadline = timezone.now() + timedelta(seconds=10)
    while len(renewed) < 2 and timezone.now() < deadline:
        time.sleep(0.05)
    keeper.release(holder)

    assert len(renewed) >= 2


def test_stop_reaches_a_writer_still_building_its_context(api, owner, fake_engine, monkeypatch):
    """A stop that comes before the model has started still stops the reply."""
    conversation = make_conversation(owner, "Chat")
    fake_engine.replies = [SCRIPTED]
    original = fake_engine.stream

    def stream_after_a_stop(messages, params, **options):
        assert services.stop_generation(conversation=conversation)
        return original(messages, params, **options)

    monkeypatch.setattr(fake_engine, "stream", stream_after_a_stop)

    response = api.post(url(conversation), {"content": "Count"}, format="json")

    assert response.status_code == 201
    reply = response.json()["reply"]
    assert reply["status"] == "cancelled"
    assert reply["content"] == ""


def test_a_finished_reply_lets_go_of_its_lease_before_the_title_is_written(
    api, owner, fake_engine, settings, monkeypatch
):
    """Writing the title takes the model a while after the reply is saved; a stop then finds
    nothing running, and the keeper does not renew a reply that is no longer being written."""
    settings.CHATBOT_AUTO_TITLE = True
    conversation = make_conversation(owner, title="")
    held_while_titling = []
    original = fake_engine.generate

    def generate(messages, params, **options):
        held_while_titling.append(leases.keeper.stop_conversation(conversation.pk))
        return original(messages, params, **options)

    monkeypatch.setattr(fake_engine, "generate", generate)

    post(api, conversation, "Hello")

    assert held_while_titling == [False]
