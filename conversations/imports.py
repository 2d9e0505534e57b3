"""Import a JSON export (exports.py describes the document) as a new conversation: the whole
document is checked before anything is stored, and every problem is named by where it is.

Over 400 lines on purpose: one small checker per kind of field, beside the one import they guard.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import quotas
from .errors import ChatError
from .exports import FORMAT, VERSION
from .models import RATING_NAMES, REPLY_COUNTS, REPLY_FIELDS, Conversation, Message
from .services import system_prompt_or_default
from .validators import lone_surrogate_problem

MAX_MESSAGES = 10_000
MAX_TITLE_CHARS = Conversation._meta.get_field("title").max_length
MAX_MODEL_CHARS = Message._meta.get_field("model").max_length
MAX_ID_CHARS = 100
MAX_GENERATION_PARAMS_CHARS = 10_000
MAX_POSITIVE_INT = 2_147_483_647  # PositiveIntegerField's range on every database

ROLES = tuple(Message.Role.values)
STATUSES = tuple(Message.Status.values)


class InvalidImport(ChatError):
    """The uploaded document is not an export this server can import. Nothing was created."""

    status_code = 400


class ImportTooLarge(InvalidImport):
    status_code = 413


def check_import_size(size: int | None) -> None:
    limit = settings.CHATBOT_MAX_IMPORT_BYTES
    if size is not None and size > limit:
        raise ImportTooLarge(
            f"The file is {_megabytes(size)}; the largest import accepted is {_megabytes(limit)}."
        )


def parse_document(raw: bytes | str) -> Any:
    """Decode an uploaded export. Raises InvalidImport if it is too large or not JSON."""
    check_import_size(len(raw))
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidImport("The file is not UTF-8 text, so it is not a JSON export.") from exc
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidImport(f"The file is not valid JSON: {exc}") from exc


def read_upload(upload) -> Any:
    """The document in an uploaded export file (pages and API), its size checked before it is
    read. Raises InvalidImport if it is too large or not JSON."""
    check_import_size(upload.size)
    return parse_document(upload.read())


def import_conversation(*, owner, document: Any) -> Conversation:
    """Create a new conversation, owned by `owner`, from an export document.

    The whole document is checked first; any problem raises InvalidImport and nothing is created.
    Messages and version groups get new ids (references between them are kept), timestamps are
    kept, and a reply that was still streaming when exported is stored as interrupted.
    """
    conversation_fields, rows = _validate(document)
    texts = (conversation_fields["system_prompt"], *(row["content"] for row in rows))
    quotas.check_room(owner=owner, new_conversation=True, texts=texts)
    now = timezone.now()
    new_ids = {row["id"]: uuid.uuid4() for row in rows}
    new_groups: dict[str, uuid.UUID] = {}
    messages = []
    for row in _parents_first(rows):
        group = row["version_group"]
        if group is None:
            version_group = uuid.uuid4()
        else:
            version_group = new_groups.setdefault(group, uuid.uuid4())
        messages.append(
            Message(
                id=new_ids[row["id"]],
                role=row["role"],
                content=row["content"],
                status=row["status"],
                error=row["error"],
                created_at=row["created_at"],
                reply_to_id=new_ids[row["reply_to"]] if row["reply_to"] is not None else None,
                version_group=version_group,
                is_active=row["is_active"],
                **{field: row[field] for field in REPLY_FIELDS},
                rating=row["rating"],
                feedback=row["feedback"],
                rated_at=row["rated_at"],
                context=_renamed(row["context"], new_ids),
            )
        )
    if conversation_fields["created_at"] is None:
        conversation_fields["created_at"] = min((row["created_at"] for row in rows), default=now)
    with transaction.atomic():
        conversation = Conversation.objects.create(
            owner=owner,
            # The import is the conversation's latest activity: it comes first in the list.
            updated_at=now,
            **conversation_fields,
        )
        for message in messages:
            message.conversation = conversation
        Message.objects.bulk_create(messages, batch_size=500)
    return conversation


# --- validation ----------------------------------------------------------------------------------


def _validate(document: Any) -> tuple[dict, list[dict]]:
    # Every string and key, before anything is stored: text no database can store would be
    # written fine by some and then fail every read of the conversation.
    if problem := lone_surrogate_problem(document):
        raise InvalidImport(problem)
    if not isinstance(document, dict):
        raise InvalidImport(
            f"Not a conversation export: the document is a JSON {_json_type(document)}, "
            "not an object."
        )
    if document.get("format") != FORMAT:
        raise InvalidImport(
            f'Not a conversation export: "format" must be "{FORMAT}" '
            f"(found {_describe(document.get('format'))})."
        )
    version = document.get("version")
    if type(version) is not int or version != VERSION:
        raise InvalidImport(
            f"Unsupported export version {_describe(version)}; this server reads version {VERSION}."
        )
    conversation = document.get("conversation")
    if not isinstance(conversation, dict):
        raise InvalidImport(f'"conversation" must be an object (found {_describe(conversation)}).')
    messages = document.get("messages")
    if not isinstance(messages, list):
        raise InvalidImport(f'"messages" must be a list (found {_describe(messages)}).')
    if len(messages) > MAX_MESSAGES:
        raise InvalidImport(
            f"The export has {len(messages)} messages; the limit is {MAX_MESSAGES}."
        )

    fields = {
        "title": _text(conversation, "title", "conversation", limit=MAX_TITLE_CHARS).strip(),
        "system_prompt": _system_prompt(conversation),
        "temperature": _number(
            conversation, "temperature", "conversation", *Conversation.TEMPERATURE_RANGE
        ),
        "max_new_tokens": _integer(
            conversation, "max_new_tokens", "conversation", *Conversation.MAX_NEW_TOKENS_RANGE
        ),
        "created_at": _timestamp(conversation, "created_at", "conversation", required=False),
    }
    rows = [_validate_message(item, f"messages[{index}]") for index, item in enumerate(messages)]

    ids: set[str] = set()
    for index, row in enumerate(rows):
        if row["id"] in ids:
            raise InvalidImport(f'messages[{index}].id: "{row["id"]}" is used twice.')
        ids.add(row["id"])
    for index, row in enumerate(rows):
        if row["reply_to"] is not None and row["reply_to"] not in ids:
            raise InvalidImport(
                f'messages[{index}].reply_to: "{row["reply_to"]}" is not the id of a message '
                "in this export."
            )
    for index, row in enumerate(rows):
        for kept in (row["context"] or {}).get("messages", []):
            if kept not in ids:
                raise InvalidImport(
                    f'messages[{index}].context.messages: "{kept}" is not the id of a message '
                    "in this export."
                )
    _check_no_cycles(rows)
    return fields, rows


def _renamed(record: dict | None, new_ids: dict) -> dict | None:
    """A context record with the imported messages' new ids."""
    if record is None:
        return None
    return {**record, "messages": [str(new_ids[kept]) for kept in record["messages"]]}


def _context_record(item: dict, where: str) -> dict | None:
    """A reply's record of what the model read (context.ContextRecord), or None."""
    record = item.get("context")
    if record is None:
        return None
    where = f"{where}.context"
    if not isinstance(record, dict):
        raise InvalidImport(f"{where} must be an object or null (found {_describe(record)}).")
    kept = record.get("messages", [])
    if not isinstance(kept, list) or not all(isinstance(i, str) and i for i in kept):
        raise InvalidImport(f"{where}.messages must be a list of message ids.")
    return {
        "system_prompt": _text(
            record, "system_prompt", where, limit=Conversation.MAX_SYSTEM_PROMPT_CHARS
        ),
        "messages": kept,
        "dropped": _integer(record, "dropped", where, 0, MAX_POSITIVE_INT) or 0,
    }


def _system_prompt(conversation: dict) -> str:
    # Left out or null: the server's default, as when a conversation is created.
    if conversation.get("system_prompt") is None:
        return system_prompt_or_default(None)
    limit = Conversation.MAX_SYSTEM_PROMPT_CHARS
    return _text(conversation, "system_prompt", "conversation", limit=limit)


def _validate_message(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise InvalidImport(f"{where} must be an object (found {_describe(item)}).")
    row = {
        "id": _reference(item, "id", where, required=True),
        "role": _choice(item, "role", where, ROLES, required=True),
        "content": _text(
            item, "content", where, limit=settings.CHATBOT_MAX_MESSAGE_CHARS, required=True
        ),
        "status": _choice(item, "status", where, STATUSES) or Message.Status.OK,
        "error": _text(item, "error", where, limit=settings.CHATBOT_MAX_MESSAGE_CHARS),
        "created_at": _timestamp(item, "created_at", where, required=True),
        "reply_to": _reference(item, "reply_to", where),
        "version_group": _reference(item, "version_group", where),
        "is_active": _boolean(item, "is_active", where, default=True),
        "model": _text(item, "model", where, limit=MAX_MODEL_CHARS),
        "generation_params": _params(item, "generation_params", where),
        "rating": RATING_NAMES.get(_choice(item, "rating", where, tuple(RATING_NAMES)) or ""),
        "feedback": _text(item, "feedback", where, limit=Message.MAX_FEEDBACK_CHARS) or None,
        "rated_at": _timestamp(item, "rated_at", where, required=False),
        "context": _context_record(item, where),
    }
    for field in REPLY_COUNTS:
        row[field] = _integer(item, field, where, 0, MAX_POSITIVE_INT)
    if row["role"] == Message.Role.USER and not row["content"].strip():
        raise InvalidImport(f"{where}.content: a user message must not be empty.")
    if row["reply_to"] is not None and row["reply_to"] == row["id"]:
        raise InvalidImport(f"{where}.reply_to: a message cannot reply to itself.")
    if row["status"] == Message.Status.STREAMING:
        # Nothing is writing this reply any more.
        row["status"] = Message.Status.INTERRUPTED
    return row


def _check_no_cycles(rows: list[dict]) -> None:
    parent = {row["id"]: row["reply_to"] for row in rows}
    done: set[str] = set()
    for start in parent:
        path: list[str] = []
        on_path: set[str] = set()
        node = start
        while node is not None and node not in done:
            if node in on_path:
                raise InvalidImport(f'messages: replies form a loop at message "{node}".')
            on_path.add(node)
            path.append(node)
            node = parent[node]
        done.update(path)


def _parents_first(rows: list[dict]) -> list[dict]:
    """The rows in document order, except that a message comes after the one it replies to
    (so no database has to defer the reply_to constraint)."""
    by_id = {row["id"]: row for row in rows}
    placed: set[str] = set()
    ordered = []
    for row in rows:
        chain = []
        node = row
        while node is not None and node["id"] not in placed:
            chain.append(node)
            node = by_id[node["reply_to"]] if node["reply_to"] is not None else None
        for item in reversed(chain):
            placed.add(item["id"])
            ordered.append(item)
    return ordered


def _missing(where: str, key: str) -> InvalidImport:
    return InvalidImport(f"{where}.{key} is required.")


def _text(obj: dict, key: str, where: str, *, limit: int, required: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise _missing(where, key)
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidImport(f"{where}.{key} must be a string (found {_describe(value)}).")
    if len(value) > limit:
        raise InvalidImport(f"{where}.{key} is {len(value)} characters; the limit is {limit}.")
    if "\x00" in value:
        raise InvalidImport(f"{where}.{key} must not contain NUL characters.")
    return value


def _reference(obj: dict, key: str, where: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _missing(where, key)
        return None
    if not isinstance(value, str) or not value:
        raise InvalidImport(f"{where}.{key} must be a non-empty string (found {_describe(value)}).")
    return _text(obj, key, where, limit=MAX_ID_CHARS)


def _choice(
    obj: dict, key: str, where: str, choices: tuple[str, ...], *, required: bool = False
) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _missing(where, key)
        return None
    if not isinstance(value, str) or value not in choices:
        raise InvalidImport(
            f"{where}.{key}: {_describe(value)} is not one of {', '.join(choices)}."
        )
    return value


def _boolean(obj: dict, key: str, where: str, *, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidImport(f"{where}.{key} must be true or false (found {_describe(value)}).")
    return value


def _integer(obj: dict, key: str, where: str, low: int, high: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidImport(
            f"{where}.{key} must be a whole number from {low} to {high} (found {_describe(value)})."
        )
    return value


def _number(obj: dict, key: str, where: str, low: float, high: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise InvalidImport(
            f"{where}.{key} must be a number from {low} to {high} (found {_describe(value)})."
        )
    return float(value)


def _timestamp(obj: dict, key: str, where: str, *, required: bool) -> datetime | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _missing(where, key)
        return None
    parsed = None
    if isinstance(value, str):
        try:
            parsed = parse_datetime(value)
        except ValueError:
            parsed = None
    if parsed is None:
        raise InvalidImport(
            f"{where}.{key} must be an ISO 8601 date and time (found {_describe(value)})."
        )
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    try:
        # Stored in UTC: an offset can move a date at either end of the calendar past it.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidImport(
            f"{where}.{key} is out of range: {_describe(value)} is not between the years 1 and "
            "9999 in UTC."
        ) from None


def _params(obj: dict, key: str, where: str) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidImport(f"{where}.{key} must be an object (found {_describe(value)}).")
    try:
        encoded = json.dumps(value)
        has_nul = _has_nul(value)
    except (ValueError, RecursionError) as exc:
        raise InvalidImport(f"{where}.{key} is nested too deeply.") from exc
    if len(encoded) > MAX_GENERATION_PARAMS_CHARS:
        raise InvalidImport(
            f"{where}.{key} is {len(encoded)} characters of JSON; the limit is "
            f"{MAX_GENERATION_PARAMS_CHARS}."
        )
    if has_nul:
        raise InvalidImport(f"{where}.{key} must not contain NUL characters.")
    return value


# --- small helpers -------------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "object"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "…"
        return json.dumps(shown)
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return f"a JSON {_json_type(value)}"
