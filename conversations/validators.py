import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

# Characters that are not text but instructions to what shows it: C0 and C1 controls (a
# terminal's ESC sequences among them) and the marks that reorder text (bidi embeddings,
# overrides and isolates), with which "exe.txt" can be shown as "txt.exe".
_CONTROLS = "\x00-\x1f\x7f-\x9f"
_BIDI_MARKS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
CONTROL_OR_BIDI = re.compile(f"[{_CONTROLS}{_BIDI_MARKS}]")
# For a terminal, line breaks and tabs stay.
TERMINAL_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_MARKS}]")


def clean_title(value: str) -> str:
    """A conversation's title as it is stored and shown: one line, without control characters
    or bidi marks, runs of whitespace made one space."""
    spaced = CONTROL_OR_BIDI.sub(lambda match: " " if match[0].isspace() else "", value)
    return " ".join(spaced.split())


def terminal_text(value: str) -> str:
    """Text to print in a terminal: stored text can hold escape sequences that would move the
    cursor, recolour or retitle the terminal, or bidi marks that reorder what is shown."""
    return TERMINAL_UNSAFE.sub("", value)


def validate_message_content(value: str) -> None:
    """What a chat message must be, for the API and the pages alike."""
    if not isinstance(value, str):
        raise ValidationError("Message content must be a string.")
    if not value.strip():
        raise ValidationError("Message content must not be empty.")
    limit = settings.CHATBOT_MAX_MESSAGE_CHARS
    if len(value) > limit:
        raise ValidationError(
            f"Message content is {len(value)} characters; the limit is {limit}.",
            code="max_length",
        )
    if "\x00" in value:
        raise ValidationError("Message content must not contain NUL characters.")


# Half of a UTF-16 pair, which JSON can spell ("\ud800") but no text encoding or database can store.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_problem(value: Any) -> str | None:
    """Where a parsed JSON value holds a lone surrogate, in a string or an object's key, as a
    sentence for the person who sent it; None if nowhere. Walks without recursion, so a deeply
    nested value cannot overflow the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if LONE_SURROGATE.search(item):
                return _surrogate_sentence(f"{path or 'the document'}")
        elif isinstance(item, dict):
            for key, child in item.items():
                if LONE_SURROGATE.search(key):
                    return _surrogate_sentence(f"a key of {path or 'the document'}")
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
    return None


def _surrogate_sentence(where: str) -> str:
    return (
        f"{where} holds a lone surrogate (an escape such as \\ud800 without its pair), "
        "which is not a character: send valid Unicode text."
    )
