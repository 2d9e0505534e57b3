"""Rate limits, for the API and the pages alike: messages a user may post per minute, and
sign-in attempts (login page, sign-up, API token) per client address.

The limits are settings (CHATBOT_MESSAGES_PER_MINUTE, CHATBOT_LOGINS_PER_MINUTE; 0 turns one
off), read at each request. DRF's throttles count in Django's cache: with the default
local-memory cache, per server process.
"""

import math

from django.conf import settings
from django.shortcuts import render
from rest_framework.throttling import SimpleRateThrottle

READING = ("GET", "HEAD", "OPTIONS")


class _PerMinute(SimpleRateThrottle):
    """A limit per minute from a setting; reading (GET, HEAD, OPTIONS) is never limited."""

    setting = ""

    def get_rate(self):
        per_minute = getattr(settings, self.setting)
        return f"{per_minute}/min" if per_minute > 0 else None

    def allow_request(self, request, view):
        return request.method in READING or super().allow_request(request, view)


class MessageRateThrottle(_PerMinute):
    """Messages posted (sent, regenerated, edited) per user."""

    scope = "messages"
    setting = "CHATBOT_MESSAGES_PER_MINUTE"

    def get_cache_key(self, request, view):
        if not request.user.is_authenticated:
            return None  # refused as unauthenticated anyway
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


class ConversationRateThrottle(MessageRateThrottle):
    """Conversations created or imported per user."""

    scope = "conversations"
    setting = "CHATBOT_CONVERSATIONS_PER_MINUTE"


class LoginRateThrottle(_PerMinute):
    """Attempts to sign in, sign up or get an API token, per client address."""

    scope = "login"
    setting = "CHATBOT_LOGINS_PER_MINUTE"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


def refuse_page(request, throttle_class):
    """For a page view: a 429 page with Retry-After when `throttle_class` refuses the request,
    else None."""
    throttle = throttle_class()
    if throttle.allow_request(request, None):
        return None
    wait = max(1, math.ceil(throttle.wait() or 1))
    response = render(request, "throttled.html", {"wait": wait}, status=429)
    response["Retry-After"] = str(wait)
    return response
