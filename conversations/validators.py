from django.conf import settings
from django.core.exceptions import ValidationError


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


def validate_max_new_tokens(value: int | None) -> None:
    """A conversation's reply budget may not exceed the server's ceiling (null: the default)."""
    limit = settings.CHATBOT_MAX_NEW_TOKENS_LIMIT
    if value is not None and value > limit:
        raise ValidationError(
            f"This server writes replies of at most {limit} tokens; {value} is more than that.",
            code="max_value",
        )
