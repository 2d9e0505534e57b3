"""What a chat completion request may say (OpenAI's `POST /v1/chat/completions`), checked
before anything is stored: OpenAI's shape, and a clear 400 naming the parameter for what this
server does not do (tools, images, audio, log-probabilities, several choices), never a silent
ignore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .. import services
from ..llm.interface import ChatMessage
from ..models import Conversation
from ..validators import validate_message_content
from .errors import OpenAIError

# Parameters OpenAI's clients may send with a value that asks for nothing: taken at that value,
# refused at any other, with the reason. (Anything else unknown is refused by name.)
NEUTRAL = {
    "n": (lambda v: v in (None, 1), "Only one choice is written per request: leave n out."),
    "logprobs": (lambda v: v in (None, False), "Log-probabilities are not returned here."),
    "top_logprobs": (lambda v: v in (None, 0), "Log-probabilities are not returned here."),
    "presence_penalty": (lambda v: v in (None, 0), "Presence penalties are not supported here."),
    "frequency_penalty": (lambda v: v in (None, 0), "Frequency penalties are not supported here."),
    "logit_bias": (lambda v: v in (None, {}), "Logit biases are not supported here."),
    "seed": (lambda v: v is None, "Seeds are not supported here."),
    "tools": (lambda v: v in (None, []), "Tools (function calling) are not supported here."),
    "tool_choice": (lambda v: v in (None, "none"), "Tools are not supported here."),
    "parallel_tool_calls": (lambda v: v is None, "Tools are not supported here."),
    "functions": (lambda v: v in (None, []), "Functions are not supported here."),
    "function_call": (lambda v: v in (None, "none"), "Functions are not supported here."),
    "response_format": (
        lambda v: v in (None, {"type": "text"}),
        "Only text replies are written here (no JSON mode or schema).",
    ),
    "modalities": (lambda v: v in (None, ["text"]), "Only text is written here."),
    "audio": (lambda v: v is None, "Audio is not supported here."),
    "prediction": (lambda v: v is None, "Predicted outputs are not supported here."),
    "web_search_options": (lambda v: v is None, "Web search is not supported here."),
    "store": (lambda v: v in (None, True), "Every exchange is stored here: leave store out."),
    "metadata": (lambda v: v in (None, {}), "Metadata is not stored here."),
    "service_tier": (
        lambda v: v in (None, "auto", "default"),
        "There is one service tier here: leave service_tier out.",
    ),
}
ROLES = ("system", "developer", "user", "assistant")
INSTRUCTION_ROLES = ("system", "developer")


def refuse_unknown(data: dict, known, neutral=NEUTRAL) -> None:
    """A key that is neither a field nor a `neutral` parameter at its neutral value is refused
    by name."""
    for key, value in data.items():
        if key in known:
            continue
        param = key
        if key in neutral:
            accepts, reason = neutral[key]
            try:
                asks_nothing = accepts(value)
            except TypeError:
                asks_nothing = False
            if not asks_nothing:
                raise OpenAIError(reason, param=param, code="unsupported_parameter")
            continue
        raise OpenAIError(
            f"Unrecognized request argument supplied: {param}.",
            param=param,
            code="unsupported_parameter",
        )


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "enum": ["text"]},
                        "text": {"type": "string"},
                    },
                    "required": ["type", "text"],
                },
            },
        ],
        "description": "Text, or a list of text parts (joined). Images, audio and files are "
        "not supported.",
    }
)
class ContentField(serializers.Field):
    """A message's content: a string, or text parts (OpenAI's `[{"type": "text", ...}]`)."""

    def to_internal_value(self, data):
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            raise serializers.ValidationError("Content must be a string or a list of text parts.")
        texts = []
        for index, part in enumerate(data):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise serializers.ValidationError(
                    {index: "A content part is an object with a type."}
                )
            if part["type"] != "text":
                raise serializers.ValidationError(
                    {
                        index: f"Content parts of type '{part['type']}' are not supported here: "
                        "only text."
                    }
                )
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise serializers.ValidationError(
                    {index: 'A text part is {"type": "text", "text": "..."}.'}
                )
            texts.append(part["text"])
        return "".join(texts)

    def to_representation(self, value):
        return value


class OpenAIChatMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(
        choices=ROLES,
        error_messages={
            "invalid_choice": "Messages of role '{input}' are not supported here: system, "
            "developer, user and assistant are."
        },
    )
    content = ContentField()

    def to_internal_value(self, data):
        if isinstance(data, dict):
            if data.get("role") in ("tool", "function"):
                raise serializers.ValidationError(
                    {"role": "Tool messages are not supported here (nor tools)."}
                )
            for key in data:
                if key not in self.fields:
                    reason = (
                        "Tool calls are not supported here."
                        if key in ("tool_calls", "function_call", "tool_call_id")
                        else f"Messages carry a role and a content only, not '{key}'."
                    )
                    raise serializers.ValidationError({key: reason})
        return super().to_internal_value(data)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ],
        "nullable": True,
        "description": "Up to 4 texts that end the reply where they first appear (left out).",
    }
)
class StopField(serializers.Field):
    def to_internal_value(self, data):
        stops = [data] if isinstance(data, str) else data
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise serializers.ValidationError("stop is a non-empty string or a list of them.")
        if len(stops) > 4:
            raise serializers.ValidationError("At most 4 stop sequences.")
        return tuple(stops)

    def to_representation(self, value):
        return list(value)


class OpenAIStreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False)
    # (Accepted; chunks carry no padding here.)
    include_obfuscation = serializers.BooleanField(required=False)


class OpenAIChatCompletionRequestSerializer(serializers.Serializer):
    model = serializers.CharField(help_text="The served model's name (GET /v1/models).")
    messages = OpenAIChatMessageSerializer(many=True, allow_empty=False)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = OpenAIStreamOptionsSerializer(required=False, allow_null=True)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    temperature = serializers.FloatField(
        required=False, allow_null=True, min_value=0.0, max_value=2.0
    )
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    stop = StopField(required=False, allow_null=True)
    user = serializers.CharField(
        required=False, allow_blank=True, max_length=256, help_text="Kept with the reply."
    )

    def to_internal_value(self, data):
        if isinstance(data, dict):
            refuse_unknown(data, self.fields)
        return super().to_internal_value(data)


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: the conversation as the product stores it, and how to answer."""

    model: str
    system_prompt: str
    messages: list[ChatMessage]  # user and assistant, the last the user's
    stream: bool
    include_usage: bool
    overrides: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)


def parse_chat_request(data: Any) -> ChatRequest:
    """The request as the services take it; OpenAIError (400, 404) naming what is wrong."""
    checked = checked_request(OpenAIChatCompletionRequestSerializer, data)
    if checked.get("stream_options") and not checked["stream"]:
        raise OpenAIError(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    system_prompt, messages = _split_instructions(checked["messages"])
    return ChatRequest(
        model=checked["model"],
        system_prompt=system_prompt,
        messages=messages,
        stream=checked["stream"],
        include_usage=bool((checked.get("stream_options") or {}).get("include_usage")),
        overrides=generation_overrides(checked, ("max_completion_tokens", "max_tokens")),
        labels={"user": checked["user"]} if checked.get("user") else {},
    )


def checked_request(serializer_class, data: Any) -> dict:
    """A request body checked by `serializer_class`, whose `model` is the served one."""
    if not isinstance(data, dict):
        raise OpenAIError("The request body must be a JSON object.")
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    check_model(serializer.validated_data["model"])
    return serializer.validated_data


def check_model(name: str) -> None:
    if name not in services.served_models():
        raise OpenAIError(
            f"The model '{name}' does not exist here; GET /v1/models lists those served.",
            status_code=404,
            param="model",
            code="model_not_found",
        )


def _split_instructions(messages: list[dict]) -> tuple[str, list[ChatMessage]]:
    """The system and developer messages at the start become the system prompt (joined by a
    blank line); user and assistant messages follow, the last of them the user's."""
    start = 0
    while start < len(messages) and messages[start]["role"] in INSTRUCTION_ROLES:
        start += 1
    system_prompt = "\n\n".join(m["content"] for m in messages[:start] if m["content"].strip())
    check_text(system_prompt, "messages", limit=Conversation.MAX_SYSTEM_PROMPT_CHARS)
    turns: list[ChatMessage] = []
    for index, message in enumerate(messages[start:], start):
        if message["role"] in INSTRUCTION_ROLES:
            raise OpenAIError(
                f"A {message['role']} message is taken here only at the start of the messages, "
                "before the user's and the assistant's.",
                param=f"messages[{index}].role",
            )
        check_text(message["content"], f"messages[{index}].content")
        turns.append({"role": message["role"], "content": message["content"]})
    if not turns or turns[-1]["role"] != "user":
        raise OpenAIError(
            "The last message must be the user's: the reply is the assistant's next turn.",
            param="messages",
        )
    if not turns[-1]["content"].strip():
        raise OpenAIError(
            "The last message must not be empty.", param=f"messages[{len(messages) - 1}].content"
        )
    return system_prompt, turns


def check_text(text: str, param: str, *, limit: int | None = None) -> None:
    """A stored text's limits (validate_message_content's, an empty text aside)."""
    if not text.strip():
        return
    if limit is not None and len(text) > limit:
        raise OpenAIError(
            f"The system prompt is {len(text)} characters; the limit is {limit}.", param=param
        )
    if limit is None:
        try:
            validate_message_content(text)
        except DjangoValidationError as exc:
            raise OpenAIError(" ".join(exc.messages), param=param) from None
    elif "\x00" in text:
        raise OpenAIError("Text must not contain NUL characters.", param=param)


def generation_overrides(checked: dict, budgets: tuple[str, ...]) -> dict[str, Any]:
    """The generation parameters a request sets for its reply; its reply budget is the first
    of the `budgets` parameters it gives."""
    param = next((name for name in budgets if checked.get(name) is not None), budgets[0])
    budget = checked.get(param)
    if budget is not None:
        try:
            Conversation.validate_max_new_tokens(budget)
        except DjangoValidationError as exc:
            raise OpenAIError(" ".join(exc.messages), param=param) from None
    chosen = {
        "max_new_tokens": budget,
        "temperature": checked.get("temperature"),
        "top_p": checked.get("top_p"),
        "stop": checked.get("stop"),
    }
    return {name: value for name, value in chosen.items() if value is not None}
