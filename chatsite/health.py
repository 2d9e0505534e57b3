"""Health checks for load balancers and orchestrators.

`/healthz`: the process is alive (it touches neither the database nor the engine).
`/readyz`: the process can serve traffic now: the database answers, and the engine answers
replies without first loading anything (ChatEngine.is_ready: the embedded model is loaded,
or the inference server answers).

Both are plain Django views: no authentication, session, CSRF token or rate limit applies, and
settings.SECURE_REDIRECT_EXEMPT lets them answer over plain HTTP. They leak nothing: a failure
answers a short fixed reason, and the full one goes to the log.
"""

import logging

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from conversations.runtime import get_engine

logger = logging.getLogger(__name__)


def _plain(text: str, status: int = 200) -> HttpResponse:
    return HttpResponse(text, status=status, content_type="text/plain; charset=utf-8")


# csrf_exempt: a POST gets its 405 from require_safe, not a 403 from the CSRF check.
@csrf_exempt
@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    return _plain("ok")


@csrf_exempt
@never_cache
@require_safe
def readyz(request: HttpRequest) -> HttpResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # whatever the database driver raises: an answer, not a 500
        logger.warning("Not ready: the database did not answer (%r).", exc)
        return _plain("not ready: database", status=503)
    try:
        engine = get_engine()
        ready = engine.is_ready()
    except Exception as exc:  # is_ready never raises; building the engine from settings may
        logger.warning("Not ready: the engine could not be built (%r).", exc)
        return _plain("not ready: engine", status=503)
    if not ready:
        logger.warning("Not ready: the engine (%s) cannot answer yet.", type(engine).__name__)
        return _plain("not ready: engine", status=503)
    return _plain("ready")
