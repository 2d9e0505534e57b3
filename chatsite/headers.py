"""Headers every dynamic response gets: a strict Content-Security-Policy, and no-store on what
is private to a signed-in user.

(Django 6.0 has its own CSP middleware; the installed Django, 5.2, does not, and a fixed policy
needs no more than this.)
"""

from django.utils.cache import add_never_cache_headers

# Our own static files only: no inline script or style, no other origin, no plugins, and no
# framing (against clickjacking, besides X-Frame-Options). Images may be data: URIs, which the
# API docs' stylesheet uses for its icons.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class SecurityHeadersMiddleware:
    """Placed after WhiteNoise, so static files (public, long-cached) never come through here."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        # A signed-in user's pages, API answers and exports: no browser or proxy keeps a copy
        # (the back button after logging out, a shared machine's disk cache). DRF puts the user
        # it authenticated (by token too) on the request.
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            add_never_cache_headers(response)
        return response
