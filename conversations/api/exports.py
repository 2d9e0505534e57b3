"""Export a conversation as a download (JSON or Markdown), the same file the pages send.

`?format=` is DRF's URL format override, so the export view offers one renderer per download
format and DRF's content negotiation picks it: `?format=json` (the default) or `?format=md`. The
renderers only choose: the file is exports.export_download's, and errors are JSON.
"""

import json

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics
from rest_framework.exceptions import NotFound
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer

from .. import exports
from ..models import Conversation
from .serializers import ExportDocumentSerializer

# --- renderers -----------------------------------------------------------------------------------


class MarkdownRenderer(BaseRenderer):
    """Chooses the Markdown transcript."""

    media_type = "text/markdown"
    format = "md"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        # Only what is not the file comes this way: an OPTIONS request's description.
        return json.dumps(data).encode(self.charset)


class ExportNegotiation(DefaultContentNegotiation):
    def filter_renderers(self, renderers, format):
        found = [renderer for renderer in renderers if renderer.format == format]
        if not found:
            formats = " or ".join(f"?format={renderer.format}" for renderer in renderers)
            raise NotFound(f"Unknown export format; use {formats}.")
        return found


# --- views ---------------------------------------------------------------------------------------


class ConversationExportView(generics.GenericAPIView):
    """Download a conversation: the full JSON document, or a Markdown transcript."""

    renderer_classes = [JSONRenderer, MarkdownRenderer]
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
                enum=list(exports.DOWNLOAD_CONTENT_TYPES),
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
        return exports.export_download(self.get_object(), request.accepted_renderer.format)

    def finalize_response(self, request, response, *args, **kwargs):
        if response.status_code >= 400 and isinstance(
            getattr(request, "accepted_renderer", None), MarkdownRenderer
        ):
            # Errors stay JSON with a `detail`, whatever format was asked for.
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)
