"""The colour theme a person chose: the system's (the default), dark or light, kept in a cookie
so that the server renders every page in it (no flash of the other theme, and no JavaScript
needed to switch)."""

from django.shortcuts import redirect
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

COOKIE = "theme"
THEMES = ("system", "dark", "light")
YEAR = 365 * 24 * 3600


def current_theme(request) -> str:
    theme = request.COOKIES.get(COOKIE, "system")
    return theme if theme in THEMES else "system"


def theme(request) -> dict:
    """Template context: the chosen theme, and the one the toggle switches to next."""
    chosen = current_theme(request)
    return {"theme": chosen, "next_theme": THEMES[(THEMES.index(chosen) + 1) % len(THEMES)]}


@require_POST
def choose_theme(request):
    chosen = request.POST.get("theme", "system")
    back = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    response = redirect(back if safe and back else "/")
    if chosen in THEMES and chosen != "system":
        response.set_cookie(
            COOKIE, chosen, max_age=YEAR, samesite="Lax", secure=request.is_secure()
        )
    else:
        response.delete_cookie(COOKIE, samesite="Lax")
    return response
