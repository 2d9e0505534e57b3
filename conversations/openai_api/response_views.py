"""OpenAI's Responses API: `POST /v1/responses`, and a stored response by its id (`GET`,
`DELETE`, its `input_items`). A response is a reply of the product's; its conversation is the
product's too, and the context of every response is rebuilt from the database."""

from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from .. import services
from ..api.streaming import EVENT_STREAM, stream_response
from ..disconnects import run_while_connected
from ..models import Conversation, Message
from ..throttles import MessageRateThrottle
from . import response_objects
from .ids import make_id, parse_id
from .items import item_list
from .response_requests import OpenAIResponseRequestSerializer, parse_response_request
from .serializers import OpenAIDeletedSerializer, OpenAIErrorSerializer
from .views import TAG, OpenAIView, first_event


class Responses(OpenAIView):
    throttle_classes = [MessageRateThrottle]

    @extend_schema(
        operation_id="openai_responses_create",
        tags=[TAG],
        request=OpenAIResponseRequestSerializer,
        responses={
            200: OpenApiTypes.OBJECT,
            (200, EVENT_STREAM): OpenApiResponse(
                response=OpenApiTypes.STR,
                description="With `stream`: the Responses API's events (`event:` and `data:`).",
            ),
            404: OpenAIErrorSerializer,
            409: OpenAIErrorSerializer,
            503: OpenAIErrorSerializer,
        },
        description="OpenAI's responses. The input is stored and answered: after "
        "`previous_response_id` (a response that is not the latest of its conversation starts "
        "a new conversation holding the turns up to it), in `conversation`, or in a new "
        "conversation. The model's context is rebuilt from the database.",
    )
    def post(self, request):
        asked = parse_response_request(request.data)
        after = conversation = None
        labels = dict(asked.labels)
        if asked.previous_response_id:
            after = owned_reply(request, asked.previous_response_id)
            labels["previous_response_id"] = make_id("resp", after.pk)
        if asked.conversation_id:
            conversation = get_object_or_404(
                Conversation.objects.owned_by(request.user), pk=asked.conversation_id
            )
        if asked.instructions is not None:
            labels["instructions"] = asked.instructions
        if "max_new_tokens" in asked.overrides:
            labels["max_output_tokens"] = asked.overrides["max_new_tokens"]
        writer = services.answer_items(
            owner=request.user,
            api_key=request.auth,
            items=asked.items,
            after=after,
            conversation=conversation,
            system_prompt=asked.instructions,
            overrides=asked.overrides,
            labels=labels,
        )
        if not asked.stream:
            reply = run_while_connected(request, writer).reply
            return Response(response_objects.response_object(reply))
        first, unwatch = first_event(request, writer)
        return stream_response(writer, response_objects.events(writer, first), unwatch=unwatch)


def owned_reply(request, pk: str) -> Message:
    """The user's reply by its UUID (404 for any other, as if it did not exist)."""
    replies = Message.objects.filter(conversation__owner=request.user, role=Message.Role.ASSISTANT)
    return get_object_or_404(replies.select_related("conversation"), pk=pk)


def reply_by_id(request, response_id: str) -> Message:
    return owned_reply(request, parse_id(response_id, "resp", "response_id"))


class ResponseDetail(OpenAIView):
    @extend_schema(
        operation_id="openai_responses_retrieve",
        tags=[TAG],
        responses={200: OpenApiTypes.OBJECT, 404: OpenAIErrorSerializer},
        description="A stored response (a reply), as it stands.",
    )
    def get(self, request, response_id: str):
        reply = reply_by_id(request, response_id)
        services.interrupt_dead_replies(conversation=reply.conversation)
        reply.refresh_from_db()
        return Response(response_objects.response_object(reply))

    @extend_schema(
        operation_id="openai_responses_delete",
        tags=[TAG],
        responses={200: OpenAIDeletedSerializer, 404: OpenAIErrorSerializer},
        description="Delete a response: the reply and the input it answered.",
    )
    def delete(self, request, response_id: str):
        reply = reply_by_id(request, response_id)
        services.delete_messages(conversation=reply.conversation, messages=[*_input(reply), reply])
        return Response({"id": response_id, "object": "response.deleted", "deleted": True})


class ResponseInputItems(OpenAIView):
    @extend_schema(
        operation_id="openai_responses_input_items",
        tags=[TAG],
        responses={200: OpenApiTypes.OBJECT, 404: OpenAIErrorSerializer},
        description="The input items a response answered (`limit`, `order`, `after`).",
    )
    def get(self, request, response_id: str):
        reply = reply_by_id(request, response_id)
        ids = [message.pk for message in _input(reply)]
        return Response(item_list(request, reply.conversation.messages.filter(pk__in=ids)))


def _input(reply: Message) -> list[Message]:
    """The messages given with the request that `reply` answered: its question and the items
    stored with it, as many as the request gave."""
    count = reply.generation_params.get("input_items", 1)
    before = (
        reply.conversation.messages.active_path()
        .filter(
            created_at__lt=reply.created_at, role__in=[Message.Role.USER, Message.Role.ASSISTANT]
        )
        .order_by("-created_at")
    )
    return list(before[:count])
