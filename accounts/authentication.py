from django.utils.translation import gettext_lazy as _
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication

from .keys import find_key


class ApiKeyAuthentication(TokenAuthentication):
    """`Authorization: Token <key>`, checked against the stored digests of API keys."""

    def authenticate_credentials(self, key):
        api_key = find_key(key)
        if api_key is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not api_key.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return api_key.user, api_key


class BearerKeyAuthentication(ApiKeyAuthentication):
    """The same keys as `Authorization: Bearer <key>`, as OpenAI's clients and most HTTP
    tools send them."""

    keyword = "Bearer"


class BearerKeyScheme(OpenApiAuthenticationExtension):
    """Bearer keys in the OpenAPI schema, apart from `Token` keys (drf-spectacular finds this
    extension by being imported with the class it describes)."""

    target_class = BearerKeyAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Bearer"
        )
