"""The export download of a chat, linked from its thread: a JSON document or a Markdown
transcript."""

import json

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.views.decorators.http import require_GET

from .. import exports
from .thread import owned_conversation

CONTENT_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}


@login_required
@require_GET
@owned_conversation
def export(request, conversation):
    extension = request.GET.get("format", "json")
    if extension == "json":
        document = exports.export_conversation(conversation)
        body = json.dumps(document, ensure_ascii=False, indent=2)
    elif extension == "md":
        body = exports.export_markdown(conversation)
    else:
        raise Http404("Unknown export format.")
    response = HttpResponse(body.encode("utf-8"), content_type=CONTENT_TYPES[extension])
    filename = exports.export_filename(conversation, extension)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
