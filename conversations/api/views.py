from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, renderers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotAcceptable
from rest_framework.response import Response

from .. import services
from ..disconnects import run_while_connected
from ..models import Conversation, Message
from ..search import search_conversations
from ..throttles import ConversationRateThrottle, MessageRateThrottle
from .serializers import (
    ActivateSerializer,
    ConversationSerializer,
    ExchangeSerializer,
    FeedbackSerializer,
    MessageSerializer,
    PostMessageSerializer,
    ReplyContextSerializer,
    StartMessageSerializer,
    StopResultSerializer,
    StreamOptionSerializer,
    context_data,
    load_versions,
    message_data,
)
from .streaming import EVENT_STREAM, EventStreamRenderer, reply_response, wants_stream

UUID = "[0-9a-fA-F-]{36}"
# JSON by default; `Accept: text/event-stream` (or "stream": true in the body) streams the reply.
STREAM_RENDERERS = [
    renderers.JSONRenderer,
    renderers.BrowsableAPIRenderer,
    EventStreamRenderer,
]
# One Server-Sent Event: its name and its JSON data.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["user_message", "delta", "done", "error", "title"]},
        "data": {"type": "string", "description": "A JSON document."},
    },
    "required": ["event", "data"],
}
STREAM_RESPONSE = {
    (200, EVENT_STREAM): OpenApiResponse(
        response=SSE_EVENT, description="The answer as Server-Sent Events (see above)."
    )
}
STREAM_NOTE = (
    'With `Accept: text/event-stream` or `"stream": true`, the answer is a stream of '
    "Server-Sent Events: `user_message`, `delta` ({text}) as the model writes, then `done` "
    "(the saved reply) or `error` ({detail, reply}), and `title` when the model named the chat."
)

ERROR_RESPONSES = {
    400: None,
    401: None,
    404: None,
    422: ExchangeSerializer,
    503: ExchangeSerializer,
}


class ConversationViewSet(viewsets.ModelViewSet):
    """Your conversations, most recently active first."""

    serializer_class = ConversationSerializer
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def handle_exception(self, exc):
        # A request that streams nothing (any GET) hears of its errors in JSON, even if it asked
        # for an event stream.
        request = self.request
        renderer = getattr(request, "accepted_renderer", None)
        if request.method == "GET" and renderer is not None and renderer.media_type == EVENT_STREAM:
            request.accepted_renderer = renderers.JSONRenderer()
            request.accepted_media_type = request.accepted_renderer.media_type
        return super().handle_exception(exc)

    def get_throttles(self):
        if self.action == "create":
            return [ConversationRateThrottle()]
        return super().get_throttles()

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return Conversation.objects.none()
        if self.action in ("list", "retrieve"):
            return Conversation.objects.listed_for(self.request.user)
        return Conversation.objects.owned_by(self.request.user)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "q",
                str,
                description="Full-text search of your conversations' titles and message text. "
                "Every word must appear in the conversation (the last one as a prefix); results "
                "come best match first, each with a `snippet` of its best matching text. "
                "Blank lists all.",
            )
        ]
    )
    def list(self, request, *args, **kwargs):
        query = request.query_params.get("q", "").strip()
        if not query:
            return super().list(request, *args, **kwargs)
        page = self.paginate_queryset(search_conversations(owner=request.user, query=query))
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    def perform_create(self, serializer):
        data = serializer.validated_data
        conversation = services.create_conversation(
            owner=self.request.user,
            title=data.get("title", ""),
            system_prompt=data.get("system_prompt"),
            temperature=data.get("temperature"),
            max_new_tokens=data.get("max_new_tokens"),
        )
        conversation.message_count = 0
        serializer.instance = conversation

    def perform_destroy(self, instance):
        services.delete_conversation(conversation=instance)

    def perform_update(self, serializer):
        conversation = services.update_conversation(
            conversation=serializer.instance, **serializer.validated_data
        )
        conversation.message_count = conversation.messages.active_path().count()

    @extend_schema(
        methods=["GET"],
        parameters=[
            OpenApiParameter(
                "include",
                str,
                enum=["active", "all"],
                description="`active` (default): the chosen version of every message, as the "
                "thread shows it. `all`: every version, oldest first.",
            )
        ],
        responses=MessageSerializer(many=True),
    )
    @extend_schema(
        methods=["POST"],
        request=PostMessageSerializer,
        responses={201: ExchangeSerializer, **STREAM_RESPONSE, **ERROR_RESPONSES},
        description="Store a message and answer it with the model. The model sees the "
        "conversation's earlier turns, rebuilt from the database. " + STREAM_NOTE,
    )
    @action(
        detail=True,
        methods=["get", "post"],
        renderer_classes=STREAM_RENDERERS,
        throttle_classes=[MessageRateThrottle],
    )
    def messages(self, request, pk=None):
        conversation = self.get_object()
        if request.method == "GET":
            if request.accepted_renderer.media_type == EVENT_STREAM:
                raise NotAcceptable("Only posting a message can answer as an event stream.")
            services.interrupt_dead_replies(conversation=conversation)
            messages = conversation.messages.with_versions().order_by("created_at")
            if request.query_params.get("include", "active") != "all":
                messages = messages.active_path()
            page = self.paginate_queryset(messages)
            return self.get_paginated_response(MessageSerializer(page, many=True).data)
        serializer = PostMessageSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        writer = services.open_message_stream(
            conversation=conversation, content=serializer.validated_data["content"]
        )
        return self._answer(request, writer, with_user_message=True)

    @extend_schema(
        request=StreamOptionSerializer,
        responses={201: ExchangeSerializer, **STREAM_RESPONSE, **ERROR_RESPONSES, 409: None},
        description="Write a new version of the last reply; earlier versions are kept. "
        + STREAM_NOTE,
    )
    @action(
        detail=True,
        methods=["post"],
        renderer_classes=STREAM_RENDERERS,
        throttle_classes=[MessageRateThrottle],
    )
    def regenerate(self, request, pk=None):
        writer = services.regenerate(conversation=self.get_object())
        return self._answer(request, writer, with_user_message=False)

    @extend_schema(
        request=PostMessageSerializer,
        responses={201: ExchangeSerializer, **STREAM_RESPONSE, **ERROR_RESPONSES, 409: None},
        description="Replace the last user message with a new version and answer it; the "
        "earlier version and its replies are kept. " + STREAM_NOTE,
    )
    @action(
        detail=True,
        methods=["post"],
        renderer_classes=STREAM_RENDERERS,
        throttle_classes=[MessageRateThrottle],
    )
    def edit(self, request, pk=None):
        conversation = self.get_object()
        serializer = PostMessageSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        writer = services.edit_last_message(
            conversation=conversation, content=serializer.validated_data["content"]
        )
        return self._answer(request, writer, with_user_message=True)

    @extend_schema(request=None, responses={200: StopResultSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        """Stop the reply being written; its partial text is kept with status cancelled."""
        stopped = services.stop_generation(conversation=self.get_object())
        detail = "Stopped." if stopped else "Nothing was being generated."
        return Response({"stopped": stopped, "detail": detail})

    @extend_schema(request=ActivateSerializer, responses={200: MessageSerializer, 409: None})
    @action(detail=True, methods=["post"])
    def activate(self, request, pk=None):
        """Switch to another version of the last message or of the last reply."""
        conversation = self.get_object()
        serializer = ActivateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        message = get_object_or_404(conversation.messages, pk=serializer.validated_data["message"])
        services.activate_version(conversation=conversation, message=message)
        message = conversation.messages.with_versions().get(pk=message.pk)
        return Response(MessageSerializer(message).data)

    def _reply(self, message_id) -> Message:
        """One of this conversation's replies (404 for any other id, or a user message)."""
        return get_object_or_404(
            self.get_object().messages, pk=message_id, role=Message.Role.ASSISTANT
        )

    @extend_schema(request=None, responses={200: ReplyContextSerializer})
    @action(detail=True, methods=["get"], url_path=f"messages/(?P<message_id>{UUID})/context")
    def context(self, request, pk=None, message_id=None):
        """What the model read to write a reply: the system prompt, the earlier messages kept
        (oldest first) and how many older ones were left out for room."""
        reply = self._reply(message_id)
        return Response(context_data(reply, services.reply_context(reply=reply)))

    @extend_schema(request=FeedbackSerializer, responses={200: MessageSerializer})
    @action(detail=True, methods=["post"], url_path=f"messages/(?P<message_id>{UUID})/feedback")
    def feedback(self, request, pk=None, message_id=None):
        """Rate a reply thumbs up or down, with an optional comment; a null rating takes both
        back."""
        reply = self._reply(message_id)
        serializer = FeedbackSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        services.rate_reply(reply=reply, rating=data["rating"], feedback=data.get("feedback"))
        return Response(message_data(reply))

    def _answer(self, request, writer, *, with_user_message: bool):
        if wants_stream(request):
            user_message = writer.question if with_user_message else None
            return reply_response(request, writer, user_message=user_message)
        exchange = run_while_connected(request, writer)
        load_versions(exchange.user_message, exchange.reply)
        return Response(ExchangeSerializer(exchange).data, status=status.HTTP_201_CREATED)


class StartMessageView(generics.GenericAPIView):
    """Post a message; without a conversation id, a new conversation starts with it."""

    serializer_class = StartMessageSerializer
    renderer_classes = STREAM_RENDERERS
    throttle_classes = [MessageRateThrottle]

    @extend_schema(
        responses={201: ExchangeSerializer, **STREAM_RESPONSE, **ERROR_RESPONSES},
        description="One call, one first answer. " + STREAM_NOTE,
    )
    def post(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        content = serializer.validated_data["content"]
        conversation_id = serializer.validated_data.get("conversation")
        if conversation_id:
            owned = Conversation.objects.owned_by(request.user)
            conversation = get_object_or_404(owned, pk=conversation_id)
            writer = services.open_message_stream(conversation=conversation, content=content)
        else:
            writer = services.open_new_conversation(owner=request.user, content=content)
        if wants_stream(request):
            return reply_response(request, writer, user_message=writer.question)
        exchange = run_while_connected(request, writer)
        load_versions(exchange.user_message, exchange.reply)
        return Response(ExchangeSerializer(exchange).data, status=status.HTTP_201_CREATED)
