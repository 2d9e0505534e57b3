"""OpenAPI schema post-processing: the errors any operation can answer, documented once.

Every API error is JSON with a human-readable `detail` (errors.py), or OpenAI's `error` object
under /v1/ (openai_api/errors.py); the operations' own
decorators document their particular outcomes (201, 409, 503 ...), and this hook adds the
statuses that any of them can meet. It also marks the response fields that are not always
there as optional."""

from ..models import FEEDBACK_FIELDS, REPLY_FIELDS

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {"type": "string", "description": "What went wrong, for a person to read."},
        "errors": {"type": "object", "description": "Validation errors by field (400 only)."},
    },
    "required": ["detail"],
}
COMMON_ERRORS = {
    "400": "The request is malformed or invalid; `detail` says why.",
    "401": "No credentials, or invalid ones.",
    "403": "Not allowed (for example, a session request without its CSRF token).",
    "404": "No such conversation among yours, or no such page of results.",
    "405": "This method is not allowed here.",
    "406": "The Accept header asks for a format this operation does not produce.",
    "413": "The request body is larger than the limit.",
    "415": "The request body is in a format this operation does not read.",
    "429": "Too many requests: retry after the number of seconds in Retry-After.",
}
METHODS = ("get", "post", "put", "patch", "delete")
# Response fields that are present only sometimes (read-only fields are otherwise listed as
# required): a conversation's `snippet` comes with search results only; a message's reply
# statistics with replies only, its `error` with failed ones only.
SOMETIMES_PRESENT = {"snippet", "reply_to", "error", *REPLY_FIELDS}
# ... and a reply's feedback, with replies only (in responses: a request to rate one needs it).
SOMETIMES_IN_RESPONSES = set(FEEDBACK_FIELDS)


def add_error_responses(result, generator, request, public):
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name, component in schemas.items():
        if "required" in component and not name.startswith("OpenAI"):
            absent = SOMETIMES_PRESENT | (
                set() if name.endswith("Request") else SOMETIMES_IN_RESPONSES
            )
            component["required"] = [f for f in component["required"] if f not in absent]
    product = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    # OpenAI's API under /v1/ answers errors in OpenAI's shape (openai_api/errors.py).
    openai = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
    for path, operations in result.get("paths", {}).items():
        error = openai if path.startswith("/v1/") else product
        for method, operation in operations.items():
            if method not in METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for code, description in COMMON_ERRORS.items():
                responses.setdefault(code, {"description": description, "content": error})
    return result
