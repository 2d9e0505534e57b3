"""OpenAI's ids for the product's rows: a prefix and the row's UUID in hex (`resp_…` a reply,
`msg_…` a message, `conv_…` a conversation)."""

import uuid

from .errors import OpenAIError


def make_id(prefix: str, pk: uuid.UUID) -> str:
    return f"{prefix}_{pk.hex}"


def parse_id(value: str, prefix: str, param: str) -> str:
    """The UUID in `value` (`prefix_` and hex); a 404 naming `param` if it is none, as for an
    id that names nothing."""
    head, _, tail = value.partition("_")
    try:
        if head != prefix:
            raise ValueError
        return str(uuid.UUID(hex=tail))
    except ValueError:
        raise OpenAIError(
            f"No {param.replace('_', ' ')} '{value}' here.",
            status_code=404,
            param=param,
            code="not_found",
        ) from None
