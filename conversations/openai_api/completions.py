"""A stored reply as OpenAI's chat completion: the whole object, or the `chat.completion.chunk`
stream (`data:` lines, then `data: [DONE]`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain

from ..llm.interface import FinishReason
from ..models import Message
from ..replies import EventKind, ReplyEvent, ReplyWriter
from .errors import error_body


def completion_id(reply: Message) -> str:
    return f"chatcmpl-{reply.pk.hex}"


def finish_reason(reply: Message) -> str:
    """OpenAI's: `length` when the budget ran out, else `stop` (a reply stopped early, by a
    stop sequence or by its client going, included)."""
    said = reply.generation_params.get("finish_reason")
    return "length" if said == FinishReason.LENGTH else "stop"


def usage(reply: Message) -> dict:
    prompt, completion = reply.prompt_tokens or 0, reply.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(reply: Message) -> dict:
    """The `chat.completion` object of a finished reply."""
    return {
        "id": completion_id(reply),
        "object": "chat.completion",
        "created": int(reply.created_at.timestamp()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(reply),
            }
        ],
        "usage": usage(reply),
        "system_fingerprint": None,
        # (Not OpenAI's: where the exchange is stored, for the product's API and pages.)
        "conversation": str(reply.conversation_id),
    }


def chunks(writer: ReplyWriter, first: ReplyEvent, *, include_usage: bool) -> Iterator[str]:
    """The reply as `chat.completion.chunk`s as the model writes it: the role, the text in
    pieces, the finish reason, the usage when asked for, `[DONE]`. A failure while writing is
    OpenAI's `error` object (the clients raise it), with no `[DONE]`."""
    reply = writer.reply
    head = {
        "id": completion_id(reply),
        "object": "chat.completion.chunk",
        "created": int(reply.created_at.timestamp()),
        "model": reply.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return _data(body)

    yield chunk({"role": "assistant", "content": ""})
    for event in chain([first], writer):
        if event.kind == EventKind.DELTA:
            yield chunk({"content": event.data})
        elif event.kind == EventKind.DONE:
            yield chunk({}, finish_reason(event.data))
            if include_usage:
                yield _data({**head, "choices": [], "usage": usage(event.data)})
            yield "data: [DONE]\n\n"
        elif event.kind == EventKind.ERROR:
            yield _data(error_body(event.detail, 503, code="generation_failed"))
            return


def _data(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
