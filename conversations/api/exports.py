"""Export a conversation as a download (JSON or Markdown) and import a JSON export.

`?format=` is DRF's URL format override, so the export view offers one renderer per download
format and DRF's content negotiation picks it: `?format=json` (the default) or `?format=md`.
"""

import json

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response

from .. import exports, imports
from ..models import Conversation, Message
from ..throttles import ConversationRateThrottle
from .parsers import JSONParser
from .serializers import ConversationSerializer, SystemPromptField

# Multipart boundaries and headers around the uploaded file.
MULTIPART_OVERHEAD = 64 * 1024


# --- renderers -----------------------------------------------------------------------------------


class ExportJSONRenderer(JSONRenderer):
    """The JSON export, indented for people who open the file; errors are rendered with it too."""

    format = "json"

    def get_indent(self, accepted_media_type, renderer_context):
        return 2


class MarkdownRenderer(BaseRenderer):
    media_type = "text/markdown"
    format = "md"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, str):
            return data.encode(self.charset)
        return json.dumps(data).encode(self.charset)  # not reached: errors are rendered as JSON


class ExportNegotiation(DefaultContentNegotiation):
    def filter_renderers(self, renderers, format):
        found = [renderer for renderer in renderers if renderer.format == format]
        if not found:
            formats = " or ".join(f"?format={renderer.format}" for renderer in renderers)
            raise NotFound(f"Unknown export format; use {formats}.")
        return found


# --- schema-only serializers: the export document, as the docs show it -------------------------


class ExportedConversationSerializer(serializers.Serializer):
    title = serializers.CharField(allow_blank=True)
    system_prompt = SystemPromptField()
    temperature = serializers.FloatField(allow_null=True, required=False)
    max_new_tokens = serializers.IntegerField(allow_null=True, required=False)
    created_at = serializers.DateTimeField(required=False)
    updated_at = serializers.DateTimeField(required=False)


class ExportedMessageSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The message's id inside this document.")
    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = serializers.CharField(allow_blank=True)
    status = serializers.ChoiceField(choices=Message.Status.choices, required=False)
    error = serializers.CharField(allow_blank=True, required=False)
    created_at = serializers.DateTimeField()
    reply_to = serializers.CharField(
        allow_null=True, required=False, help_text="The id of the message this one answers."
    )
    version_group = serializers.CharField(
        allow_null=True, required=False, help_text="Versions of one turn share a group."
    )
    is_active = serializers.BooleanField(
        required=False, help_text="The chosen version of its group."
    )
    model = serializers.CharField(allow_blank=True, required=False)
    prompt_tokens = serializers.IntegerField(allow_null=True, required=False)
    completion_tokens = serializers.IntegerField(allow_null=True, required=False)
    ttft_ms = serializers.IntegerField(allow_null=True, required=False)
    total_ms = serializers.IntegerField(allow_null=True, required=False)
    context_turns = serializers.IntegerField(allow_null=True, required=False)
    generation_params = serializers.DictField(required=False)


class ExportDocumentSerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=[exports.FORMAT])
    version = serializers.ChoiceField(choices=[exports.VERSION])
    exported_at = serializers.DateTimeField(required=False)
    conversation = ExportedConversationSerializer()
    messages = ExportedMessageSerializer(
        many=True, help_text="Every version of every message, oldest first."
    )


class ImportUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="A JSON export of a conversation.")


# --- views ---------------------------------------------------------------------------------------


class ConversationExportView(generics.GenericAPIView):
    """Download a conversation: the full JSON document, or a Markdown transcript."""

    renderer_classes = [ExportJSONRenderer, MarkdownRenderer]
    content_negotiation_class = ExportNegotiation

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return Conversation.objects.none()
        return Conversation.objects.owned_by(self.request.user)

    @extend_schema(
        operation_id="conversations_export",
        parameters=[
            OpenApiParameter(
                "format",
                OpenApiTypes.STR,
                OpenApiParameter.QUERY,
                enum=["json", "md"],
                default="json",
                description="json: the whole conversation, every version of every message, "
                "importable with POST /api/conversations/import/. md: a readable transcript "
                "of the chosen versions.",
            )
        ],
        responses={
            (200, "application/json"): ExportDocumentSerializer,
            (200, "text/markdown"): OpenApiResponse(OpenApiTypes.STR),
            401: None,
            404: None,
        },
    )
    def get(self, request, pk):
        conversation = self.get_object()
        if request.accepted_renderer.format == MarkdownRenderer.format:
            body, extension = exports.export_markdown(conversation), "md"
        else:
            body, extension = exports.export_conversation(conversation), "json"
        filename = exports.export_filename(conversation, extension)
        return Response(body, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    def finalize_response(self, request, response, *args, **kwargs):
        if response.status_code >= 400 and isinstance(
            getattr(request, "accepted_renderer", None), MarkdownRenderer
        ):
            # Errors stay JSON with a `detail`, whatever format was asked for.
            request.accepted_renderer = ExportJSONRenderer()
            request.accepted_media_type = ExportJSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


class ConversationImportView(generics.GenericAPIView):
    """Create a new conversation from a JSON export: the document as the body, or uploaded as
    the multipart field `file`. Every version is restored; ids are new."""

    parser_classes = [JSONParser, MultiPartParser]
    throttle_classes = [ConversationRateThrottle]
    serializer_class = ConversationSerializer

    @extend_schema(
        operation_id="conversations_import",
        request={
            "application/json": ExportDocumentSerializer,
            "multipart/form-data": ImportUploadSerializer,
        },
        responses={201: ConversationSerializer, 400: None, 401: None, 413: None},
    )
    def post(self, request):
        multipart = request.content_type.startswith("multipart/")
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        imports.check_import_size(length - (MULTIPART_OVERHEAD if multipart else 0))
        if multipart:
            upload = request.FILES.get("file")
            if upload is None:
                raise imports.InvalidImport('Upload the export file as the field "file".')
            imports.check_import_size(upload.size)
            document = imports.parse_document(upload.read())
        else:
            document = request.data
        conversation = imports.import_conversation(owner=request.user, document=document)
        conversation.message_count = conversation.messages.active_path().count()
        return Response(
            ConversationSerializer(conversation).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": reverse("conversation-detail", args=[conversation.pk])},
        )
