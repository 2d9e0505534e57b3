"""The /v1/ endpoints: OpenAI's shapes in and out, the product's services below."""

import time

from drf_spectacular.utils import extend_schema
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import ApiKeyAuthentication, BearerKeyAuthentication

from .. import services
from . import errors
from .serializers import OpenAIErrorSerializer, OpenAIModelListSerializer, OpenAIModelSerializer

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
        if model not in services.served_models():
            raise errors.OpenAIError(
                f"The model '{model}' does not exist here; GET /v1/models lists those served.",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        return Response(model_object(model))
