"""The pages' export downloads and import upload. The API's are in api/transfer.py."""

import json

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_GET, require_http_methods

from .. import transfer
from ..errors import ChatError
from ..throttles import ConversationRateThrottle, throttled
from .thread import owned_conversation

CONTENT_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}


@login_required
@require_GET
@owned_conversation
def export(request, conversation):
    extension = request.GET.get("format", "json")
    if extension == "json":
        document = transfer.export_conversation(conversation)
        body = json.dumps(document, ensure_ascii=False, indent=2)
    elif extension == "md":
        body = transfer.export_markdown(conversation)
    else:
        raise Http404("Unknown export format.")
    response = HttpResponse(body.encode("utf-8"), content_type=CONTENT_TYPES[extension])
    filename = transfer.export_filename(conversation, extension)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
@throttled(ConversationRateThrottle)
def import_conversation(request):
    """The form is on the chat list; a GET just goes there."""
    if request.method == "GET":
        return redirect("conversations:list")
    upload = request.FILES.get("file")
    try:
        if upload is None:
            raise transfer.InvalidImport("Choose a JSON export file to import.")
        transfer.check_import_size(upload.size)
        document = transfer.parse_document(upload.read())
        conversation = transfer.import_conversation(owner=request.user, document=document)
    except ChatError as exc:  # not an export, or past a storage limit
        flash.error(request, f"Could not import the file: {exc.detail}")
        return redirect("conversations:list")
    flash.success(request, f"Imported “{conversation.display_title}”.")
    return redirect(conversation)
