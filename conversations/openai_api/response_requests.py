"""What a request for a response may say (OpenAI's `POST /v1/responses`), checked before
anything is stored: `input` as text or message items (text parts only), the conversation it
goes on from (`previous_response_id` or `conversation`), and how to answer. What this server
does not do (tools, images, files, reasoning, ...) is a 400 naming the parameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..llm.interface import ChatMessage
from ..models import Conversation
from .chat_requests import (
    INSTRUCTION_ROLES,
    ROLES,
    check_text,
    checked_request,
    generation_overrides,
    refuse_unknown,
)
from .chat_requests import NEUTRAL as CHAT_NEUTRAL
from .errors import OpenAIError
from .ids import parse_id

NEUTRAL = {
    # (What both APIs take alike is chat completions' rule.)
    **{name: CHAT_NEUTRAL[name] for name in ("tools", "top_logprobs")},
    "tool_choice": (lambda v: v in (None, "none", "auto"), "Tools are not supported here."),
    "parallel_tool_calls": (lambda v: v in (None, False, True), ""),
    "text": (
        lambda v: v in (None, {}, {"format": {"type": "text"}}),
        "Only text replies are written here (no JSON schema).",
    ),
    "reasoning": (lambda v: v in (None, {}), "Reasoning is not supported by the served model."),
    "include": (lambda v: v in (None, []), "There is nothing more to include here."),
    "background": (lambda v: v in (None, False), "Background responses are not supported here."),
    "truncation": (
        lambda v: v in (None, "auto"),
        "Conversations too long for the model keep their newest turns here: truncation is "
        "always 'auto'.",
    ),
    "metadata": (lambda v: v in (None, {}), "Metadata of responses is not stored here."),
    "store": (lambda v: v in (None, True), "Every response is stored here: leave store out."),
    "service_tier": (lambda v: v in (None, "auto", "default"), "There is one service tier."),
    "max_tool_calls": (lambda v: v is None, "Tools are not supported here."),
    "prompt": (lambda v: v is None, "Stored prompts are not supported here."),
    "stream_options": (
        lambda v: v in (None, {}) or set(v) <= {"include_obfuscation"},
        "stream_options holds include_obfuscation only.",
    ),
}


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "enum": ["message"]},
                        "role": {"type": "string", "enum": list(ROLES)},
                        "content": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "object"}},
                            ]
                        },
                    },
                    "required": ["role", "content"],
                },
            },
        ],
        "description": "A user message's text, or message items (text parts only).",
    }
)
class InputField(serializers.JSONField):
    pass


class OpenAIResponseRequestSerializer(serializers.Serializer):
    model = serializers.CharField(help_text="The served model's name (GET /v1/models).")
    input = InputField()
    instructions = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        trim_whitespace=False,
        help_text="The system prompt of the conversation (it replaces one set before).",
    )
    previous_response_id = serializers.CharField(required=False, allow_null=True)
    conversation = serializers.JSONField(
        required=False, allow_null=True, help_text='A conversation\'s id, or {"id": ...}.'
    )
    stream = serializers.BooleanField(required=False, default=False)
    max_output_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    temperature = serializers.FloatField(
        required=False, allow_null=True, min_value=0.0, max_value=2.0
    )
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    user = serializers.CharField(required=False, allow_blank=True, max_length=256)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            refuse_unknown(data, self.fields, NEUTRAL)
        return super().to_internal_value(data)


@dataclass(frozen=True)
class ResponseRequest:
    model: str
    items: list[ChatMessage]  # user and assistant, the last the user's
    instructions: str | None  # the system prompt to set; None: leave it
    previous_response_id: str | None  # the reply's id (a UUID's hex), or
    conversation_id: str | None  # the conversation's
    stream: bool
    overrides: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)


def parse_response_request(data: Any) -> ResponseRequest:
    checked = checked_request(OpenAIResponseRequestSerializer, data)
    previous = checked.get("previous_response_id")
    conversation = checked.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not isinstance(conversation, str):
        raise OpenAIError("conversation is a conversation's id.", param="conversation")
    if previous and conversation:
        raise OpenAIError(
            "Give previous_response_id or conversation, not both.", param="conversation"
        )
    instructions, items = _items(checked["input"])
    if checked.get("instructions") is not None:
        instructions = checked["instructions"]
    if instructions is not None:
        check_text(instructions, "instructions", limit=Conversation.MAX_SYSTEM_PROMPT_CHARS)
    labels: dict[str, Any] = {"input_items": len(items)}
    if checked.get("user"):
        labels["user"] = checked["user"]
    return ResponseRequest(
        model=checked["model"],
        items=items,
        instructions=instructions,
        previous_response_id=previous and parse_id(previous, "resp", "previous_response_id"),
        conversation_id=conversation and parse_id(conversation, "conv", "conversation"),
        stream=checked["stream"],
        overrides=generation_overrides(checked, ("max_output_tokens",)),
        labels=labels,
    )


def _items(value: Any) -> tuple[str | None, list[ChatMessage]]:
    """The input as the system prompt its leading system and developer items give (None if
    none) and the user and assistant messages after them, the last the user's."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise OpenAIError("input is a text or a non-empty list of message items.", param="input")
    instructions, items = message_items(value, "input")
    if not items or items[-1]["role"] != "user" or not items[-1]["content"].strip():
        raise OpenAIError(
            "The last input item must be a user message with text: the response is the "
            "assistant's next turn.",
            param="input",
        )
    return instructions, items


def message_items(value: list, param: str) -> tuple[str | None, list[ChatMessage]]:
    """Message items as the system prompt the leading system and developer ones give (None if
    none) and the user and assistant messages after them."""
    instructions: list[str] = []
    items: list[ChatMessage] = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        role, text = _message(item, where)
        if role in INSTRUCTION_ROLES:
            if items:
                raise OpenAIError(
                    f"A {role} message is taken here only at the start of the {param}.",
                    param=f"{where}.role",
                )
            instructions.append(text)
            continue
        check_text(text, f"{where}.content")
        items.append({"role": role, "content": text})
    joined = "\n\n".join(text for text in instructions if text.strip())
    return (joined if instructions else None), items


def _message(item: Any, where: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise OpenAIError("An input item is an object.", param=where)
    kind = item.get("type", "message")
    if kind != "message":
        raise OpenAIError(
            f"Input items of type '{kind}' are not supported here: only messages.",
            param=f"{where}.type",
        )
    for key in item:
        if key not in ("type", "role", "content", "id", "status"):
            raise OpenAIError(f"Unrecognized input item field: {key}.", param=f"{where}.{key}")
    role = item.get("role")
    if role not in ROLES:
        raise OpenAIError(
            f"Messages of role '{role}' are not supported here: system, developer, user and "
            "assistant are.",
            param=f"{where}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise OpenAIError("content is a text or a list of parts.", param=f"{where}.content")
    texts = []
    for number, part in enumerate(content):
        param = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise OpenAIError(
                f"Content parts of type '{kind}' are not supported here: only text.",
                param=f"{param}.type",
            )
        if not isinstance(part.get("text"), str):
            raise OpenAIError("A text part holds its text.", param=f"{param}.text")
        texts.append(part["text"])
    return role, "".join(texts)
