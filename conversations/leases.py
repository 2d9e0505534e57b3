"""Replies being written: their text saved as it grows, and a lease held on their row, so a
reply whose server died frees its conversation by itself.

Each process saves the text of all the replies it is writing together, every FLUSH_SECONDS, in
one transaction that also renews their leases: whichever writer finds the save due does it as
its pieces come, and a keeper thread does it every third of CHATBOT_STALE_REPLY_SECONDS, also
while a reply waits for the model (a full batch, a model still loading) and writes nothing. One
transaction for hundreds of streams, instead of one each, keeps a web process that relays many
streams from an inference server off the database's write lock. A reply whose row
no longer says streaming (stopped from another process, or given up for dead) is stopped.

A streaming reply whose lease is older than CHATBOT_STALE_REPLY_SECONDS has lost its writer (a
worker killed, a server gone); whoever next looks marks it interrupted, keeping its text, in one
conditional UPDATE that a writer renewing its lease at that moment cannot lose to.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from . import connections
from .models import Message

logger = logging.getLogger(__name__)

INTERRUPTED_REASON = "Its server stopped while writing it; the text written until then is kept."
# How often the text of the replies being written is saved (and a stop from elsewhere noticed).
FLUSH_SECONDS = 0.5
# Replies saved in one statement at most (SQLite allows some 32k parameters in one).
SAVE_BATCH = 500


class Holder(Protocol):
    """What the keeper needs of a reply's writer."""

    reply: Message
    text: str  # what it has written so far (it only grows)

    def stop(self) -> None: ...


def stale_before():
    """Leases renewed before this moment have lost their writer."""
    return timezone.now() - timedelta(seconds=settings.CHATBOT_STALE_REPLY_SECONDS)


def interrupt_dead_replies(messages) -> int:
    """Mark the replies among `messages` (a queryset) whose writer is gone as interrupted;
    their text stays. Returns how many."""
    expired = Q(lease_renewed_at__lt=stale_before()) | Q(lease_renewed_at__isnull=True)
    dead = messages.filter(expired, status=Message.Status.STREAMING)
    count = dead.update(status=Message.Status.INTERRUPTED, error=INTERRUPTED_REASON)
    if count:
        logger.warning("Marked %d replies whose writer was gone as interrupted.", count)
    return count


def being_written(messages):
    """The replies among `messages` (a queryset) that a live writer is writing: streaming, with
    a lease renewed in time. (One whose server died is not, even before anyone marks it.)"""
    return messages.filter(status=Message.Status.STREAMING, lease_renewed_at__gte=stale_before())


def _save_texts(texts: list[tuple[object, str]]) -> None:
    """Write each (reply id, text) into its row if the row still says streaming: one statement
    prepared once, each reply a row of parameters. (A CASE of one branch per reply, which the
    ORM's update would build, costs some 30 ms of Python for 256 replies, twice a second.)"""
    if not texts:
        return
    quote = connection.ops.quote_name
    table, pk, content, status = (
        quote(name)
        for name in (
            Message._meta.db_table,
            Message._meta.pk.column,
            Message._meta.get_field("content").column,
            Message._meta.get_field("status").column,
        )
    )
    prepare = Message._meta.pk.get_db_prep_value
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {table} SET {content} = %s WHERE {pk} = %s AND {status} = %s",
            [(text, prepare(key, connection), Message.Status.STREAMING) for key, text in texts],
        )


@dataclass
class _Held:
    holder: Holder
    saved: int = 0  # the length of its text saved
    due: float = 0.0  # when (time.monotonic) to save it next


class LeaseKeeper:
    """The replies this process is writing: their text saved and leases renewed, stopped when
    asked."""

    def __init__(self) -> None:
        self._held: dict[object, _Held] = {}  # by reply id
        self._lock = threading.Lock()
        self._saving = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, holder: Holder) -> None:
        with self._lock:
            self._held[holder.reply.pk] = _Held(holder)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reply-leases", daemon=True)
                self._thread.start()

    def release(self, holder: Holder) -> None:
        with self._lock:
            self._held.pop(holder.reply.pk, None)

    def holds(self, reply_id) -> bool:
        """Whether a writer of this process holds the reply's lease now."""
        with self._lock:
            return reply_id in self._held

    def stop_conversation(self, conversation_id) -> bool:
        """Stop the replies this process is writing in a conversation; True if there were any."""
        with self._lock:
            holders = [
                held.holder
                for held in self._held.values()
                if held.holder.reply.conversation_id == conversation_id
            ]
        for holder in holders:
            holder.stop()
        return bool(holders)

    def renew_if_due(self, holder: Holder) -> None:
        """Called by a writer as its text grows: renew() if its text was saved FLUSH_SECONDS
        ago, unless another thread is at it. Every save sets the next one FLUSH_SECONDS later
        for all the replies it saved, so the process saves about once per FLUSH_SECONDS,
        whatever the number of replies. A reply's first text is saved at once, on its own, so
        that whoever opens the conversation sees the reply begun."""
        held = self._held.get(holder.reply.pk)
        if held is None:
            return
        if held.saved == 0 and holder.text:
            with connections.briefly():
                self._renew([held], timezone.now())
            return
        if time.monotonic() < held.due:
            return
        if not self._saving.acquire(blocking=False):
            return
        try:
            if time.monotonic() >= held.due:
                with connections.briefly():
                    self.renew()
        finally:
            self._saving.release()

    def renew(self) -> None:
        """Save the new text of the replies held and renew their leases; stop those whose row
        no longer says streaming (stopped from another process, or given up for dead during a
        long pause). A row that says streaming no more is not written: its writer's last save
        holds all of its text."""
        with self._lock:
            records = list(self._held.values())
        now = timezone.now()
        for start in range(0, len(records), SAVE_BATCH):
            self._renew(records[start : start + SAVE_BATCH], now)

    def _renew(self, records: list[_Held], now) -> None:
        texts = {held.holder.reply.pk: held.holder.text for held in records}
        rows = Message.objects.filter(pk__in=list(texts), status=Message.Status.STREAMING)
        grown = [
            (pk, text)
            for held in records
            if len(text := texts[pk := held.holder.reply.pk]) != held.saved
        ]
        if len(records) == 1:  # (a reply's first text, most often): one statement
            fields = {"content": grown[0][1]} if grown else {}
            renewed = rows.update(lease_renewed_at=now, **fields)
        else:
            with transaction.atomic():
                renewed = rows.update(lease_renewed_at=now)
                _save_texts(grown)
        due = time.monotonic() + FLUSH_SECONDS
        for held in records:
            held.saved = len(texts[held.holder.reply.pk])
            held.due = due
        if renewed == len(records):
            return
        alive = set(rows.values_list("pk", flat=True))
        for held in records:
            if held.holder.reply.pk not in alive:
                held.holder.stop()

    def _run(self) -> None:
        while True:
            time.sleep(settings.CHATBOT_STALE_REPLY_SECONDS / 3)
            try:
                with self._saving, connections.briefly():
                    self.renew()
            except Exception:  # the next round tries again; two may fail before a lease ends
                logger.exception("Renewing the leases of replies being written failed")


keeper = LeaseKeeper()
