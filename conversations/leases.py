"""Replies being written hold a lease on their row, so a reply whose server died frees its
conversation by itself.

The writer renews the lease with every save of its text, and a keeper thread in each process
renews the leases of all the replies the process is writing every third of
CHATBOT_STALE_REPLY_SECONDS, also while a reply waits for the model (a full batch, a model still
loading) and writes nothing. A streaming reply whose lease is older than that has lost its
writer (a worker killed, a server gone); whoever next looks marks it interrupted, keeping its
text, in one conditional UPDATE that a writer renewing its lease at that moment cannot lose to.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Protocol

from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from .models import Message

logger = logging.getLogger(__name__)

INTERRUPTED_REASON = "Its server stopped while writing it; the text written until then is kept."


class Holder(Protocol):
    """What the keeper needs of a reply's writer."""

    reply: Message

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


class LeaseKeeper:
    """The replies this process is writing: their leases renewed, stopped when asked."""

    def __init__(self) -> None:
        self._held: dict[object, Holder] = {}  # by reply id
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, holder: Holder) -> None:
        with self._lock:
            self._held[holder.reply.pk] = holder
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reply-leases", daemon=True)
                self._thread.start()

    def release(self, holder: Holder) -> None:
        with self._lock:
            self._held.pop(holder.reply.pk, None)

    def stop_conversation(self, conversation_id) -> bool:
        """Stop the replies this process is writing in a conversation; True if there were any."""
        with self._lock:
            holders = [h for h in self._held.values() if h.reply.conversation_id == conversation_id]
        for holder in holders:
            holder.stop()
        return bool(holders)

    def renew(self) -> None:
        """Renew the leases of the replies held; stop those whose row no longer says streaming
        (stopped from another process, or given up for dead during a long pause)."""
        with self._lock:
            holders = dict(self._held)
        if not holders:
            return
        rows = Message.objects.filter(pk__in=list(holders), status=Message.Status.STREAMING)
        if rows.update(lease_renewed_at=timezone.now()) == len(holders):
            return
        alive = set(rows.values_list("pk", flat=True))
        for pk, holder in holders.items():
            if pk not in alive:
                holder.stop()

    def _run(self) -> None:
        while True:
            time.sleep(settings.CHATBOT_STALE_REPLY_SECONDS / 3)
            try:
                close_old_connections()  # (as a request would: CONN_MAX_AGE, broken links)
                self.renew()
            except Exception:  # the next round tries again; two may fail before a lease ends
                logger.exception("Renewing the leases of replies being written failed")


keeper = LeaseKeeper()
