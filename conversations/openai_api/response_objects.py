"""A stored reply as OpenAI's response object (`resp_…`), its messages as items (`msg_…`), and
the reply being written as the Responses API's event stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain

from ..llm.interface import FinishReason
from ..models import Message
from ..replies import EventKind, ReplyEvent, ReplyWriter
from .ids import make_id

# The reply's status -> the response's.
STATUSES = {
    Message.Status.OK: "completed",
    Message.Status.STREAMING: "in_progress",
    Message.Status.CANCELLED: "cancelled",
    Message.Status.INTERRUPTED: "incomplete",
    Message.Status.ERROR: "failed",
}


def response_object(reply: Message, *, status: str | None = None) -> dict:
    """The response of `reply`: as it is stored, or as it stood when `status` was told."""
    params = reply.generation_params
    status = status or STATUSES[Message.Status(reply.status)]
    incomplete = None
    if status == "completed" and params.get("finish_reason") == FinishReason.LENGTH:
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    elif status == "incomplete":
        incomplete = {"reason": "interrupted"}
    error = None
    if status == "failed":
        error = {"code": "server_error", "message": reply.error or "The model could not answer."}
    in_progress = status == "in_progress"
    return {
        "id": make_id("resp", reply.pk),
        "object": "response",
        "created_at": int(reply.created_at.timestamp()),
        "status": status,
        "model": reply.model,
        "output": [] if in_progress else [output_item(reply, status)],
        "usage": None if in_progress else usage(reply),
        "error": error,
        "incomplete_details": incomplete,
        "instructions": params.get("instructions"),
        "previous_response_id": params.get("previous_response_id"),
        "conversation": {"id": make_id("conv", reply.conversation_id)},
        "max_output_tokens": params.get("max_output_tokens"),
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "user": params.get("user"),
        "metadata": {},
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "auto",
        "store": True,
        "background": False,
    }


def usage(reply: Message) -> dict:
    prompt, completion = reply.prompt_tokens or 0, reply.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def output_item(reply: Message, status: str = "completed") -> dict:
    """The reply as the response's one output item."""
    item = message_item(reply)
    item["status"] = "completed" if status == "completed" else "incomplete"
    return item


def message_item(message: Message) -> dict:
    """A stored message as OpenAI's message item (a conversation's, or a response's)."""
    if message.role == Message.Role.ASSISTANT:
        part = {"type": "output_text", "text": message.content, "annotations": []}
    else:
        part = {"type": "input_text", "text": message.content}
    return {
        "id": make_id("msg", message.pk),
        "type": "message",
        "role": message.role,
        "status": "completed",
        "content": [part],
    }


def events(writer: ReplyWriter, first: ReplyEvent) -> Iterator[str]:
    """The Responses API's events for a reply as it is written, in OpenAI's order, each with
    its `sequence_number`: created, in_progress, the output item and its text part added, the
    text deltas, the text, part and item done, then completed (or incomplete, when the budget
    ran out). A failure is `error` then `response.failed`."""
    reply = writer.reply
    item_id = make_id("msg", reply.pk)
    sequence = 0

    def event(kind: str, **data) -> str:
        nonlocal sequence
        body = {"type": kind, "sequence_number": sequence, **data}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=response_object(reply, status="in_progress"))
    yield event("response.in_progress", response=response_object(reply, status="in_progress"))
    started = {**message_item(reply), "status": "in_progress", "content": []}
    yield event("response.output_item.added", output_index=0, item=started)
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", **where, part=part)
    for happened in chain([first], writer):
        if happened.kind == EventKind.DELTA:
            yield event("response.output_text.delta", **where, delta=happened.data, logprobs=[])
        elif happened.kind == EventKind.DONE:
            done = happened.data
            text = done.content
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part={**part, "text": text})
            final = response_object(done)
            yield event("response.output_item.done", output_index=0, item=final["output"][0])
            kind = "response.incomplete" if final["status"] == "incomplete" else None
            yield event(kind or "response.completed", response=final)
        elif happened.kind == EventKind.ERROR:
            yield event("error", code="server_error", message=happened.detail, param=None)
            yield event("response.failed", response=response_object(happened.data))
            return
