from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import parsers, permissions, renderers, serializers, status
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from conversations.api.parsers import JSONParser
from conversations.throttles import SIGN_IN_THROTTLES

from . import keys
from .models import ApiKey

TOKEN_KEY_NAME = "API token"


class TokenView(APIView):
    """POST: a username and password for a new API key, shown this once; attempts are limited
    per client address and per username (CHATBOT_LOGINS_PER_MINUTE). DELETE: revoke the key
    the request is authenticated with."""

    parser_classes = [parsers.FormParser, parsers.MultiPartParser, JSONParser]
    renderer_classes = [renderers.JSONRenderer]

    def get_permissions(self):
        if self.request.method == "POST":
            return []
        return [permissions.IsAuthenticated()]

    def get_throttles(self):
        if self.request.method == "POST":
            return [throttle() for throttle in SIGN_IN_THROTTLES]
        return []

    @extend_schema(
        request=AuthTokenSerializer,
        responses={200: inline_serializer("Token", {"token": serializers.CharField()})},
    )
    def post(self, request):
        serializer = AuthTokenSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        _, key = keys.issue_key(user=serializer.validated_data["user"], name=TOKEN_KEY_NAME)
        return Response({"token": key})

    @extend_schema(request=None, responses={204: OpenApiResponse(description="Revoked.")})
    def delete(self, request):
        if not isinstance(request.auth, ApiKey):
            raise ValidationError(
                {"detail": "Send the key to revoke in the header: Authorization: Token <key>."}
            )
        keys.revoke_key(request.auth)
        return Response(status=status.HTTP_204_NO_CONTENT)
