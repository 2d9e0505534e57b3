"""Server-Sent Events for replies: `user_message`, then `delta`s as the model writes, then
`done` with the saved reply (or `error`), and `title` when the model has named the chat."""

import json
from collections.abc import Iterator

from django.http import StreamingHttpResponse
from rest_framework import renderers

from ..disconnects import watch_client
from ..rendering import render_markdown
from ..replies import EventKind, ReplyWriter
from .serializers import load_versions, message_data

EVENT_STREAM = "text/event-stream"


class EventStreamRenderer(renderers.BaseRenderer):
    """Lets clients ask for `text/event-stream`; a response that is not a stream (an error
    before the reply started) is sent as one `error` event."""

    media_type = EVENT_STREAM
    format = "event-stream"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return format_event("error", data).encode()


def wants_stream(request) -> bool:
    if isinstance(request.data, dict) and request.data.get("stream") is True:
        return True
    accepted = getattr(request, "accepted_renderer", None)
    return accepted is not None and accepted.media_type == EVENT_STREAM


def format_event(kind: str, data) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def reply_response(request, writer: ReplyWriter, *, user_message=None) -> StreamingHttpResponse:
    """Stream `writer`'s reply. If the client goes away, the model is stopped and the partial
    reply is kept as cancelled."""
    unwatch = watch_client(request, writer.stop)
    return stream_response(writer, _reply_events(writer, user_message), unwatch=unwatch)


def stream_response(
    writer: ReplyWriter, chunks: Iterator[str], *, unwatch
) -> StreamingHttpResponse:
    """`chunks` (the text of `writer`'s events, as a client reads them) as an event stream;
    `unwatch` ends the watch on its client (disconnects.watch_client)."""
    body = _StreamBody(writer, chunks, unwatch)
    response = StreamingHttpResponse(body, content_type=f"{EVENT_STREAM}; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # tell proxies such as nginx not to buffer the stream
    return response


class _StreamBody:
    """The events of one reply as a response body. The server closes the body when the client
    goes away or the stream ends; closing it also cancels a reply whose events were never
    read (a generator never started runs no cleanup of its own), so its reserved row does not
    keep the conversation busy."""

    def __init__(self, writer: ReplyWriter, chunks: Iterator[str], unwatch) -> None:
        self.writer = writer
        self._chunks = chunks
        self._unwatch = unwatch

    def __iter__(self):
        return self._chunks

    def close(self) -> None:
        self._unwatch()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self.writer.cancel_and_finish()  # (nothing more to a reply already finished)


def _reply_events(writer: ReplyWriter, user_message) -> Iterator[str]:
    """The product's events: `user_message`, `delta`s, then `done` or `error`, and `title`."""
    if user_message is not None:
        load_versions(user_message)  # an edit's new version: n of n
        data = message_data(user_message)
        data["conversation"] = str(user_message.conversation_id)
        yield format_event("user_message", data)
    for event in writer:
        if event.kind == EventKind.DELTA:
            yield format_event(event.kind, {"text": event.data})
        elif event.kind == EventKind.DONE:
            load_versions(event.data)
            reply = message_data(event.data)
            reply["html"] = str(render_markdown(event.data.content))
            yield format_event(event.kind, reply)
        elif event.kind == EventKind.ERROR:
            reply = message_data(event.data)
            yield format_event(event.kind, {"detail": event.detail, "reply": reply})
        elif event.kind == EventKind.TITLE:
            yield format_event(event.kind, {"title": event.data})
