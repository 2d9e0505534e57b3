"""Writing one reply into the database while the model streams it.

The reply row is reserved with the question (status "streaming", no text yet), so a second
message to the same conversation sees it busy; its text is saved at its first piece and every
FLUSH_SECONDS while the model writes (with those of the process's other replies, leases.py),
and it ends as ok, cancelled or error, with the statistics of the run. Nothing about a running
reply lives only in memory: a stop request from any process flips the row to "cancelled", and
the writer is stopped at the next save. While it writes, the reply holds a lease on its row, so
a reply whose server died frees its conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from django.db import transaction
from django.utils import timezone

from . import connections, metrics
from .context import ContextRecord, build_context
from .errors import ChatError, ContextOverflow, GenerationFailed
from .leases import keeper
from .llm.interface import ChatEngine, FinishReason, GenerationParams, StreamingReply
from .llm.stop_sequences import stop_at
from .models import Conversation, Message
from .runtime import cache_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exchange:
    user_message: Message
    reply: Message


class EventKind(StrEnum):
    """What a ReplyEvent says (its value names the event on the wire)."""

    DELTA = "delta"  # data: the next piece of text
    DONE = "done"  # data: the saved reply
    ERROR = "error"  # data: the failed reply; detail: why
    TITLE = "title"  # data: the conversation's new title


@dataclass(frozen=True)
class ReplyEvent:
    """What a streaming client hears of a reply."""

    kind: EventKind
    data: Any
    detail: str = ""


def reserve_reply(
    question: Message,
    *,
    engine: ChatEngine,
    params: GenerationParams,
    new_question: bool = False,
    labels: dict[str, Any] | None = None,
) -> Message:
    """The row of the reply to `question`, before any text: status streaming, so the
    conversation counts as busy from the moment the question is saved (call it in the same
    transaction). Regenerating: the earlier replies stay, as inactive versions (`new_question`:
    it has no replies yet, nothing to set aside). `labels` are kept with its parameters."""
    if not new_question:
        question.replies.filter(is_active=True).update(is_active=False)
    reply: Message = Message.objects.create(
        conversation_id=question.conversation_id,
        role=Message.Role.ASSISTANT,
        content="",
        status=Message.Status.STREAMING,
        lease_renewed_at=timezone.now(),
        reply_to=question,
        version_group=question.pk,
        model=engine.model_name,
        generation_params={**params.as_dict(), **(labels or {})},
    )
    if new_question:  # the first of its versions (see api.serializers.load_versions)
        reply.version = reply.versions = 1
    return reply


@dataclass
class ReplyWriter:
    """Answers `question` (a saved user message) in `conversation`. Iterate for ReplyEvents;
    afterwards `reply` is the saved reply and `error` the ChatError, if generation failed."""

    conversation: Conversation
    question: Message
    reply: Message  # reserved with the question (reserve_reply), status streaming, no text yet
    engine: ChatEngine
    params: GenerationParams
    # Called after a finished reply; may return one more event (the conversation's new title).
    after_done: Callable[[ReplyWriter], ReplyEvent | None] | None = None
    # What the request said of itself, kept with the reply's parameters (OpenAI's `user`).
    labels: dict[str, Any] = field(default_factory=dict)
    error: ChatError | None = None
    text: str = ""  # written so far, for the lease keeper to save
    _stream: StreamingReply | None = field(default=None, repr=False)
    _events: Iterator[ReplyEvent] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _context: ContextRecord | None = field(default=None, repr=False)  # once built

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self._events is None:
            self._events = self._write()
        return self._events

    def run(self) -> Exchange:
        """Write the whole reply; raise the ChatError if it failed."""
        for _ in self:
            pass
        if self.error is not None:
            raise self.error
        return Exchange(self.question, self.reply)

    def stop(self) -> None:
        """Stop the model within a step; the reply ends with what was written (thread-safe)."""
        self._stopped = True
        if self._stream is not None:
            self._stream.cancel()

    def cancel_and_finish(self) -> None:
        """The listener went away: stop the model and save the partial reply as cancelled.
        A reply whose writing never began (its stream closed before the first event) is
        cancelled here, so its conversation is free at once, not when its lease runs out.
        Does nothing more to a reply already finished."""
        self.stop()
        if self._events is None:
            self._events = iter(())  # nothing is written from now on
            if Message.objects.filter(pk=self.reply.pk, status=Message.Status.STREAMING).update(
                status=Message.Status.CANCELLED
            ):
                self.reply.status = Message.Status.CANCELLED
                metrics.reply_ended(Message.Status.CANCELLED)
            return
        for _ in self._events:
            pass

    def _write(self) -> Iterator[ReplyEvent]:
        keeper.hold(self)
        try:
            with metrics.reply_streaming():
                finished = yield from self._write_held()
        finally:
            keeper.release(self)
        if finished and self.after_done is not None and (extra := self.after_done(self)):
            yield extra

    def _write_held(self) -> Generator[ReplyEvent, None, bool]:
        """The reply's events while it holds its lease; True if it was saved as written."""
        try:
            context = build_context(
                self.conversation, new_message=self.question, engine=self.engine, params=self.params
            )
            self._context = context.record()
            stream = self._stream = stop_at(
                self.engine.stream(
                    context.messages, self.params, cache_key=cache_key(self.conversation)
                ),
                self.params.stop,
            )
        except ContextOverflow as exc:
            yield self._fail(exc, exc.detail)
            return False
        except Exception as exc:
            yield self._fail_unexpected(exc, "")
            return False
        if self._stopped:  # stopped while the context was being built
            stream.cancel()
        connections.release()  # (none is needed until the next save)

        try:
            for delta in stream:
                self.text += delta
                keeper.renew_if_due(self)
                yield ReplyEvent(EventKind.DELTA, delta)
        except Exception as exc:
            yield self._fail_unexpected(exc, self.text)
            return False
        yield ReplyEvent(EventKind.DONE, self._finish(stream, context.context_turns))
        return True

    # Rows

    def _finish(self, stream: StreamingReply, context_turns: int) -> Message:
        result = stream.result
        assert result is not None, "a stream read to its end holds its result"
        cancelled = result.finish_reason == FinishReason.CANCELLED
        fields: dict[str, Any] = {
            "content": result.text,
            "status": Message.Status.CANCELLED if cancelled else Message.Status.OK,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "ttft_ms": result.ttft_ms,
            "total_ms": result.total_ms,
            "context_turns": context_turns,
            "context": self._context,
            "generation_params": {
                **self.params.as_dict(),
                **self.labels,
                "finish_reason": result.finish_reason,
            },
        }
        # Saved as is while the row still says streaming; a row stopped (cancelled) or given up
        # for dead (interrupted) meanwhile keeps that status, with all the text written.
        if not self._save(fields, only_streaming=True):
            del fields["status"]
            self._save(fields)
            row = Message.objects.filter(pk=self.reply.pk).values("status", "error").first()
            self.reply.status, self.reply.error = (
                (row["status"], row["error"]) if row else (Message.Status.CANCELLED, "")
            )
        metrics.reply_ended(self.reply.status, result)
        return self.reply

    def _fail(self, error: ChatError, reason: str) -> ReplyEvent:
        fields = {"status": Message.Status.ERROR, "error": reason}
        self._save(fields)
        metrics.reply_ended(Message.Status.ERROR)
        error.exchange = Exchange(self.question, self.reply)
        self.error = error
        return ReplyEvent(EventKind.ERROR, self.reply, detail=error.detail)

    def _fail_unexpected(self, exc: Exception, text: str) -> ReplyEvent:
        logger.exception("Generation failed in conversation %s", self.conversation.pk)
        reason = f"{type(exc).__name__}: {exc}"
        # (The context, if it was built: what the model read before it failed.)
        Message.objects.filter(pk=self.reply.pk).update(content=text, context=self._context)
        self.reply.content, self.reply.context = text, self._context  # (for the 503 body)
        error = GenerationFailed(
            f"The model could not answer: {reason.rstrip('.')}. Your message was saved."
        )
        return self._fail(error, reason)

    def _save(self, fields: dict[str, Any], *, only_streaming: bool = False) -> bool:
        """Update the reply's row and the conversation's time. With `only_streaming`, nothing
        happens (and False is returned) unless the row still says streaming."""
        now = timezone.now()
        rows = Message.objects.filter(pk=self.reply.pk)
        if only_streaming:
            rows = rows.filter(status=Message.Status.STREAMING)
        with transaction.atomic():
            if not rows.update(**fields) and only_streaming:
                return False
            Conversation.objects.filter(pk=self.conversation.pk).update(updated_at=now)
        for name, value in fields.items():
            setattr(self.reply, name, value)
        self.conversation.updated_at = now
        return True
