"""The export download of a chat, linked from its thread: a JSON document or a Markdown
transcript."""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.views.decorators.http import require_GET

from .. import exports
from .thread import owned_conversation


@login_required
@require_GET
@owned_conversation
def export(request, conversation):
    extension = request.GET.get("format", "json")
    if extension not in exports.DOWNLOAD_CONTENT_TYPES:
        raise Http404("Unknown export format.")
    return exports.export_download(conversation, extension)
