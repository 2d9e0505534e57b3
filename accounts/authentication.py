from django.utils.translation import gettext_lazy as _
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
