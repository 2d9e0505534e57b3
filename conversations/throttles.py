"""Rate limits, for the API and the pages alike: messages a user may post per minute, and
sign-in attempts (login page, admin login, sign-up, API token) per client address and per
username.

The limits are settings (CHATBOT_MESSAGES_PER_MINUTE, CHATBOT_LOGINS_PER_MINUTE; 0 turns one
off), read at each request. DRF's throttles count in Django's database cache
(settings.RATE_LIMIT_CACHE): every server process on every host counts against the same limits.
(A count is read, then written: requests that arrive at the same instant may each see the
count before the others, so a burst can pass a limit by a few.)
"""

import functools
import hashlib
import math
from collections.abc import Mapping

from django.conf import settings
from django.core.cache import caches
from django.shortcuts import render
from rest_framework.throttling import SimpleRateThrottle

READING = ("GET", "HEAD", "OPTIONS")


def client_address(request) -> str:
    """The address of the client: the one the server sees, or, behind CHATBOT_TRUSTED_PROXIES
    reverse proxies, the one the first of them put in X-Forwarded-For. Anything before it in
    that header was written by the client and proves nothing."""
    remote = request.META.get("REMOTE_ADDR", "")
    proxies = settings.CHATBOT_TRUSTED_PROXIES
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    chain = [address.strip() for address in forwarded.split(",") if address.strip()]
    if proxies <= 0 or not chain:
        return remote
    return chain[-min(proxies, len(chain))]


class _PerMinute(SimpleRateThrottle):
    """A limit per minute from a setting; reading (GET, HEAD, OPTIONS) is never limited."""

    setting = ""

    @property
    def cache(self):
        return caches[settings.RATE_LIMIT_CACHE]

    def get_rate(self):
        per_minute = getattr(settings, self.setting)
        return f"{per_minute}/min" if per_minute > 0 else None

    def allow_request(self, request, view):
        return request.method in READING or super().allow_request(request, view)

    def get_ident(self, request):
        return client_address(request)


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


class UsernameLoginRateThrottle(_PerMinute):
    """The same attempts per username given, whatever the address: guessing one account's
    password from many addresses is limited too."""

    scope = "login-username"
    setting = "CHATBOT_LOGINS_PER_MINUTE"

    def get_cache_key(self, request, view):
        # A DRF request has .data (JSON or form); a page's has .POST.
        fields = request.data if hasattr(request, "data") else request.POST
        username = fields.get("username") if isinstance(fields, Mapping) else None
        if not isinstance(username, str) or not username:
            return None  # refused by the form or serializer anyway
        # Hashed: a username may hold any character, a cache key may not.
        ident = hashlib.sha256(username.lower().encode("utf-8", "replace")).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


SIGN_IN_THROTTLES = [LoginRateThrottle, UsernameLoginRateThrottle]


def refuse_page(request, *throttle_classes):
    """For a page view: a 429 page with Retry-After when one of `throttle_classes` refuses the
    request, else None. Every one counts the request, as DRF's views do."""
    waits = []
    for throttle_class in throttle_classes:
        throttle = throttle_class()
        if not throttle.allow_request(request, None):
            waits.append(throttle.wait() or 1)
    if not waits:
        return None
    wait = max(1, math.ceil(max(waits)))
    response = render(request, "throttled.html", {"wait": wait}, status=429)
    response["Retry-After"] = str(wait)
    return response


def throttled(*throttle_classes):
    """Limit a page view by `throttle_classes`, as a DRF view's throttle_classes do: a request
    one of them refuses gets the 429 page (refuse_page) instead of the view."""

    def decorate(view):
        @functools.wraps(view)
        def limited(request, *args, **kwargs):
            return refuse_page(request, *throttle_classes) or view(request, *args, **kwargs)

        return limited

    return decorate


# For a page view whose posts are sign-in attempts: limited per address and per username.
limit_sign_ins = throttled(*SIGN_IN_THROTTLES)
