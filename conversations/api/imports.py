"""Import a JSON export as a new conversation: the document as the body, or uploaded as a file."""

from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from .. import imports
from ..throttles import ConversationRateThrottle
from .parsers import JSONParser
from .serializers import ConversationSerializer, ExportDocumentSerializer, ImportUploadSerializer

# Multipart boundaries and headers around the uploaded file.
MULTIPART_OVERHEAD = 64 * 1024


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
            document = imports.read_upload(upload)
        else:
            document = request.data
        conversation = imports.import_conversation(owner=request.user, document=document)
        conversation.message_count = conversation.messages.active_path().count()
        return Response(
            ConversationSerializer(conversation).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": reverse("conversation-detail", args=[conversation.pk])},
        )
