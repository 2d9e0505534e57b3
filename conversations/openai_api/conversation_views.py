"""OpenAI's Conversations API over the product's conversations (`conv_…`): the same rows the
web UI shows, their messages as items (`msg_…`)."""

from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from .. import services
from ..models import Conversation, Message
from ..throttles import ConversationRateThrottle
from .errors import OpenAIError
from .ids import make_id, parse_id
from .items import item_list
from .response_objects import message_item
from .response_requests import message_items
from .serializers import (
    OpenAIConversationCreateRequestSerializer,
    OpenAIConversationItemsRequestSerializer,
    OpenAIConversationSerializer,
    OpenAIConversationUpdateRequestSerializer,
    OpenAIDeletedSerializer,
    OpenAIErrorSerializer,
)
from .views import TAG, OpenAIView

MAX_METADATA_KEYS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512
ITEM_ROLES = (Message.Role.USER, Message.Role.ASSISTANT)


def conversation_object(conversation: Conversation) -> dict:
    return {
        "id": make_id("conv", conversation.pk),
        "object": "conversation",
        "created_at": int(conversation.created_at.timestamp()),
        "metadata": conversation.metadata or {},
    }


def checked_metadata(data: dict) -> dict | None:
    """The request's `metadata` (None when it gives none): up to 16 string keys and values."""
    metadata = data.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        raise OpenAIError(
            f"metadata is an object of at most {MAX_METADATA_KEYS} keys.", param="metadata"
        )
    for key, value in metadata.items():
        if len(key) > MAX_KEY_CHARS or not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
            raise OpenAIError(
                f"metadata keys are at most {MAX_KEY_CHARS} characters, and values strings of "
                f"at most {MAX_VALUE_CHARS}.",
                param=f"metadata.{key}",
            )
    return metadata


def request_items(data: dict, *, allow_instructions: bool) -> tuple[str | None, list]:
    items = data.get("items", [])
    if not isinstance(items, list) or len(items) > 20:
        raise OpenAIError("items is a list of at most 20 message items.", param="items")
    instructions, messages = message_items(items, "items")
    if instructions is not None and not allow_instructions:
        raise OpenAIError(
            "A conversation's system prompt is set when it is created, or by a response's "
            "instructions.",
            param="items",
        )
    return instructions, messages


def body(request) -> dict:
    if not isinstance(request.data, dict):
        raise OpenAIError("The request body must be a JSON object.")
    return request.data


def refuse_other_keys(data: dict, known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            raise OpenAIError(f"Unrecognized request argument supplied: {key}.", param=key)


def owned(request, conversation_id: str) -> Conversation:
    pk = parse_id(conversation_id, "conv", "conversation_id")
    return get_object_or_404(Conversation.objects.owned_by(request.user), pk=pk)


def shown_items(conversation: Conversation):
    """The conversation's messages as the thread shows them (the chosen versions)."""
    return conversation.messages.active_path().filter(role__in=ITEM_ROLES)


class Conversations(OpenAIView):
    throttle_classes = [ConversationRateThrottle]

    @extend_schema(
        operation_id="openai_conversations_create",
        tags=[TAG],
        request=OpenAIConversationCreateRequestSerializer,
        responses={200: OpenAIConversationSerializer},
        description="A new conversation, with `items` (messages, stored unanswered) and "
        "`metadata`. System or developer items at the start are its system prompt.",
    )
    def post(self, request):
        data = body(request)
        refuse_other_keys(data, ("items", "metadata"))
        metadata = checked_metadata(data)
        instructions, messages = request_items(data, allow_instructions=True)
        conversation = services.create_conversation(
            owner=request.user,
            title=services.fallback_title(
                next((m["content"] for m in messages if m["role"] == "user"), "")
            ),
            system_prompt=instructions or "",
            api_key=request.auth,
            metadata=metadata,
        )
        if messages:
            services.add_messages(conversation=conversation, messages=messages)
        return Response(conversation_object(conversation))


class ConversationDetail(OpenAIView):
    @extend_schema(
        operation_id="openai_conversations_retrieve",
        tags=[TAG],
        responses={200: OpenAIConversationSerializer, 404: OpenAIErrorSerializer},
    )
    def get(self, request, conversation_id: str):
        return Response(conversation_object(owned(request, conversation_id)))

    @extend_schema(
        operation_id="openai_conversations_update",
        tags=[TAG],
        request=OpenAIConversationUpdateRequestSerializer,
        responses={200: OpenAIConversationSerializer, 404: OpenAIErrorSerializer},
        description="Replace the conversation's `metadata`.",
    )
    def post(self, request, conversation_id: str):
        conversation = owned(request, conversation_id)
        data = body(request)
        refuse_other_keys(data, ("metadata",))
        metadata = checked_metadata(data)
        if metadata is None:
            raise OpenAIError("metadata is required.", param="metadata")
        Conversation.objects.filter(pk=conversation.pk).update(metadata=metadata)
        conversation.metadata = metadata
        return Response(conversation_object(conversation))

    @extend_schema(
        operation_id="openai_conversations_delete",
        tags=[TAG],
        responses={200: OpenAIDeletedSerializer, 404: OpenAIErrorSerializer},
        description="Delete the conversation and every message in it.",
    )
    def delete(self, request, conversation_id: str):
        services.delete_conversation(conversation=owned(request, conversation_id))
        return Response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


class ConversationItems(OpenAIView):
    @extend_schema(
        operation_id="openai_conversation_items_list",
        tags=[TAG],
        responses={200: OpenApiTypes.OBJECT, 404: OpenAIErrorSerializer},
        description="The conversation's messages as the thread shows them (`limit`, `order`, "
        "`after`).",
    )
    def get(self, request, conversation_id: str):
        conversation = owned(request, conversation_id)
        return Response(item_list(request, shown_items(conversation)))

    @extend_schema(
        operation_id="openai_conversation_items_create",
        tags=[TAG],
        request=OpenAIConversationItemsRequestSerializer,
        responses={200: OpenApiTypes.OBJECT, 404: OpenAIErrorSerializer, 409: None},
        description="Add messages at the end of the conversation, unanswered.",
    )
    def post(self, request, conversation_id: str):
        conversation = owned(request, conversation_id)
        data = body(request)
        refuse_other_keys(data, ("items",))
        _, messages = request_items(data, allow_instructions=False)
        if not messages:
            raise OpenAIError("items must hold at least one message.", param="items")
        stored = services.add_messages(conversation=conversation, messages=messages)
        data = [message_item(message) for message in stored]
        return Response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
                "has_more": False,
            }
        )


class ConversationItem(OpenAIView):
    def item(self, request, conversation_id: str, item_id: str) -> tuple[Conversation, Message]:
        conversation = owned(request, conversation_id)
        pk = parse_id(item_id, "msg", "item_id")
        return conversation, get_object_or_404(conversation.messages, pk=pk)

    @extend_schema(
        operation_id="openai_conversation_items_retrieve",
        tags=[TAG],
        responses={200: OpenApiTypes.OBJECT, 404: OpenAIErrorSerializer},
    )
    def get(self, request, conversation_id: str, item_id: str):
        return Response(message_item(self.item(request, conversation_id, item_id)[1]))

    @extend_schema(
        operation_id="openai_conversation_items_delete",
        tags=[TAG],
        responses={200: OpenAIConversationSerializer, 404: OpenAIErrorSerializer},
        description="Delete one message (a user message with the replies to it); the answer "
        "is the conversation.",
    )
    def delete(self, request, conversation_id: str, item_id: str):
        conversation, message = self.item(request, conversation_id, item_id)
        services.delete_messages(conversation=conversation, messages=[message])
        return Response(conversation_object(conversation))
