from django.db.models import Count
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from .. import services
from ..models import Conversation
from .serializers import (
    ConversationSerializer,
    ExchangeSerializer,
    MessageSerializer,
    PostMessageSerializer,
    StartMessageSerializer,
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

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return Conversation.objects.none()
        queryset = Conversation.objects.filter(owner=self.request.user).order_by("-updated_at")
        if self.action in ("list", "retrieve"):
            queryset = queryset.annotate(message_count=Count("messages"))
        return queryset

    def perform_create(self, serializer):
        data = serializer.validated_data
        conversation = services.create_conversation(
            owner=self.request.user,
            title=data.get("title", ""),
            system_prompt=data.get("system_prompt"),
        )
        conversation.message_count = 0
        serializer.instance = conversation

    def perform_update(self, serializer):
        conversation = serializer.save()
        conversation.message_count = conversation.messages.count()

    @extend_schema(methods=["GET"], responses=MessageSerializer(many=True))
    @extend_schema(
        methods=["POST"],
        request=PostMessageSerializer,
        responses={201: ExchangeSerializer, **ERROR_RESPONSES},
        description="Store a message and answer it with the model. The model sees the "
        "conversation's earlier turns, rebuilt from the database.",
    )
    @action(detail=True, methods=["get", "post"])
    def messages(self, request, pk=None):
        conversation = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(conversation.messages.order_by("created_at"))
            return self.get_paginated_response(MessageSerializer(page, many=True).data)
        serializer = PostMessageSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        exchange = services.post_message(
            conversation=conversation, content=serializer.validated_data["content"]
        )
        return Response(ExchangeSerializer(exchange).data, status=status.HTTP_201_CREATED)


class StartMessageView(generics.GenericAPIView):
    """Post a message; without a conversation id, a new conversation starts with it."""

    serializer_class = StartMessageSerializer

    @extend_schema(responses={201: ExchangeSerializer, **ERROR_RESPONSES})
    def post(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        content = serializer.validated_data["content"]
        conversation_id = serializer.validated_data.get("conversation")
        if conversation_id:
            conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
            exchange = services.post_message(conversation=conversation, content=content)
        else:
            _, exchange = services.start_conversation(owner=request.user, content=content)
        return Response(ExchangeSerializer(exchange).data, status=status.HTTP_201_CREATED)
