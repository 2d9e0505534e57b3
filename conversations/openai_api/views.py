"""The /v1/ endpoints: OpenAI's shapes in and out, the product's services below."""

import time

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import ApiKeyAuthentication, BearerKeyAuthentication

from .. import services
from ..api.streaming import EVENT_STREAM, stream_response
from ..disconnects import run_while_connected, watch_client
from ..replies import EventKind
from ..throttles import MessageRateThrottle
from . import completions, errors
from .chat_requests import (
    OpenAIChatCompletionRequestSerializer,
    check_model,
    parse_chat_request,
)
from .serializers import (
    OpenAIChatCompletionSerializer,
    OpenAIErrorSerializer,
    OpenAIModelListSerializer,
    OpenAIModelSerializer,
)

TAG = "OpenAI-compatible (/v1)"
# OpenAI's model objects carry a creation time; ours is when this process began serving.
STARTED = int(time.time())


class OpenAIView(APIView):
    """Keys as OpenAI's clients send them (Bearer first: a 401 asks for one), JSON only, and
    errors in OpenAI's shape."""

    authentication_classes = [BearerKeyAuthentication, ApiKeyAuthentication]
    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer]

    def get_exception_handler(self):
        return errors.exception_handler


def first_event(request, writer):
    """The first event of `writer`'s reply, awaited before the answer starts, so that a reply
    that cannot be written (the model failed, the context is too long) is an error status,
    not a broken stream; and the function that ends the watch on the client."""
    unwatch = watch_client(request, writer.stop)
    try:
        first = next(iter(writer))
    except BaseException:
        unwatch()
        writer.cancel_and_finish()
        raise
    if first.kind == EventKind.ERROR:
        unwatch()
        writer.cancel_and_finish()  # (ends its events: the reply's lease is let go)
        raise writer.error
    return first, unwatch


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "system"}


# (the errors any operation can meet are added by api/schema.py, in this shape too)


class ModelList(OpenAIView):
    @extend_schema(
        operation_id="openai_models_list",
        tags=[TAG],
        responses={200: OpenAIModelListSerializer},
        description="The served model (OpenAI's `GET /v1/models`).",
    )
    def get(self, request):
        return Response(
            {"object": "list", "data": [model_object(name) for name in services.served_models()]}
        )


class ModelDetail(OpenAIView):
    @extend_schema(
        operation_id="openai_model_retrieve",
        tags=[TAG],
        responses={200: OpenAIModelSerializer, 404: OpenAIErrorSerializer},
        description="One served model by its name (OpenAI's `GET /v1/models/{model}`).",
    )
    def get(self, request, model: str):
        check_model(model)
        return Response(model_object(model))


class ChatCompletions(OpenAIView):
    throttle_classes = [MessageRateThrottle]

    @extend_schema(
        operation_id="openai_chat_completions_create",
        tags=[TAG],
        request=OpenAIChatCompletionRequestSerializer,
        responses={
            200: OpenAIChatCompletionSerializer,
            (200, EVENT_STREAM): OpenApiResponse(
                response=OpenApiTypes.STR,
                description="With `stream`: `chat.completion.chunk`s as `data:` lines, then "
                "`data: [DONE]`.",
            ),
            404: OpenAIErrorSerializer,
            409: OpenAIErrorSerializer,
            503: OpenAIErrorSerializer,
        },
        description="OpenAI's chat completions. The exchange is stored: in the conversation "
        "that the messages before the last continue (same key, same turns), else in a new "
        "one holding them. The model's context is rebuilt from the database.",
    )
    def post(self, request):
        chat = parse_chat_request(request.data)
        writer = services.continue_transcript(
            owner=request.user,
            api_key=request.auth,
            system_prompt=chat.system_prompt,
            messages=chat.messages,
            overrides=chat.overrides,
            labels=chat.labels,
        )
        conversation = str(writer.conversation.pk)
        if not chat.stream:
            reply = run_while_connected(request, writer).reply
            response = Response(completions.completion(reply))
        else:
            first, unwatch = first_event(request, writer)
            body = completions.chunks(writer, first, include_usage=chat.include_usage)
            response = stream_response(writer, body, unwatch=unwatch)
        response["X-Conversation-Id"] = conversation
        return response
