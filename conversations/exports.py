"""Export a conversation: as a JSON document, which imports.py reads back, or as a Markdown
transcript. The pages and the API both send the download that export_download builds.

The JSON document keeps every version of every message, so an import restores the branches:

    {
      "format": "local-chat.conversation",
      "version": 1,
      "exported_at": "2026-11-26T00:40:00+00:00",
      "conversation": {"title", "system_prompt", "temperature", "max_new_tokens",
                       "created_at", "updated_at"},
      "messages": [  # oldest first
        {"id", "role", "content", "status", "error", "created_at", "reply_to", "version_group",
         "is_active", "model", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms",
         "context_turns", "generation_params", "rating", "feedback", "rated_at", "context"},
        ...
      ]
    }

`id`, `reply_to` and `version_group` are only references inside the document: an import gives
every message and every version group a new id. A `system_prompt` left out or null is the
server's default, and "" is none, as everywhere else (services.system_prompt_or_default).
"""

from __future__ import annotations

import json
from datetime import datetime

from django.http import HttpResponse
from django.utils import timezone
from django.utils.text import slugify

from .models import REPLY_FIELDS, Conversation, Message, rating_name

FORMAT = "local-chat.conversation"
VERSION = 1
FILENAME_STEM_CHARS = 60
# The download formats, by file extension (the `?format=` of the pages and the API alike).
DOWNLOAD_CONTENT_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}


def export_download(conversation: Conversation, extension: str) -> HttpResponse:
    """The conversation as a file to download, in the format of `extension` (a key of
    DOWNLOAD_CONTENT_TYPES): the JSON document, indented for people who open it, or the
    Markdown transcript."""
    if extension == "json":
        text = json.dumps(export_conversation(conversation), ensure_ascii=False, indent=2)
    elif extension == "md":
        text = export_markdown(conversation)
    else:
        raise ValueError(f"Not an export format: {extension!r}")
    response = HttpResponse(text.encode("utf-8"), content_type=DOWNLOAD_CONTENT_TYPES[extension])
    filename = export_filename(conversation, extension)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def export_conversation(conversation: Conversation) -> dict:
    """The whole conversation, every version of every message, as a JSON-ready document."""
    messages = conversation.messages.order_by("created_at", "id")
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": _iso(timezone.now()),
        "conversation": {
            "title": conversation.title,
            "system_prompt": conversation.system_prompt,
            "temperature": conversation.temperature,
            "max_new_tokens": conversation.max_new_tokens,
            "created_at": _iso(conversation.created_at),
            "updated_at": _iso(conversation.updated_at),
        },
        "messages": [_export_message(message) for message in messages],
    }


def _export_message(message: Message) -> dict:
    return {
        "id": str(message.id),
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "error": message.error,
        "created_at": _iso(message.created_at),
        "reply_to": str(message.reply_to_id) if message.reply_to_id else None,
        "version_group": str(message.version_group),
        "is_active": message.is_active,
        **{field: getattr(message, field) for field in REPLY_FIELDS},
        # Replies: their owner's rating, and what the model read (ids of this document's
        # messages: context.ContextRecord).
        "rating": rating_name(message.rating),
        "feedback": message.feedback,
        "rated_at": _iso(message.rated_at) if message.rated_at else None,
        "context": message.context,
    }


LABELS = {
    Message.Role.USER: "You",
    Message.Role.ASSISTANT: "Assistant",
    Message.Role.SYSTEM: "System",
}
STATUS_NOTES = {
    Message.Status.CANCELLED: "Stopped by the user; the reply above is partial.",
    Message.Status.INTERRUPTED: "Interrupted while being written; the reply above is partial.",
    Message.Status.STREAMING: "Still being written when exported; the reply above is partial.",
}


def export_markdown(conversation: Conversation) -> str:
    """A readable transcript of the active path (the chosen versions), oldest first.

    Message text is written as-is: the transcript is a download, never rendered by this site.
    """
    messages = list(conversation.messages.active_path().order_by("created_at", "id"))
    title = " ".join(conversation.display_title.split())
    count = len(messages)
    lines = [
        f"# {title}",
        "",
        f"*Exported {_when(timezone.now())} · {count} message{'s' if count != 1 else ''} "
        "(the chosen version of each turn)*",
        "",
    ]
    if conversation.system_prompt:
        lines += ["## System prompt", "", conversation.system_prompt, ""]
    lines += ["## Conversation", ""]
    if not messages:
        lines += ["*No messages.*", ""]
    for message in messages:
        heading = f"**{LABELS.get(message.role, message.role)}** · {_when(message.created_at)}"
        if message.role == Message.Role.ASSISTANT and message.model:
            heading += f" · {message.model}"
        lines += ["---", "", heading, ""]
        if message.content:
            lines += [message.content, ""]
        if message.status == Message.Status.ERROR:
            reason = " ".join(message.error.split()) or "unknown error"
            lines += [f"> **No reply — generation failed:** {reason}", ""]
        elif message.status in STATUS_NOTES:
            lines += [f"> *{STATUS_NOTES[message.status]}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def export_filename(conversation: Conversation, extension: str) -> str:
    """A download name from the title: ASCII letters, digits and hyphens only."""
    stem = slugify(conversation.title)[:FILENAME_STEM_CHARS].strip("-_") or "conversation"
    return f"{stem}.{extension}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _when(moment: datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M %Z")
