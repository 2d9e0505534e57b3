"""The import upload: a JSON export, sent from the form on the chat list, as a new chat."""

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods

from .. import imports
from ..errors import ChatError
from ..throttles import ConversationRateThrottle, throttled


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
            raise imports.InvalidImport("Choose a JSON export file to import.")
        document = imports.read_upload(upload)
        conversation = imports.import_conversation(owner=request.user, document=document)
    except ChatError as exc:  # not an export, or past a storage limit
        flash.error(request, f"Could not import the file: {exc.detail}")
        return redirect("conversations:list")
    flash.success(request, f"Imported “{conversation.display_title}”.")
    return redirect(conversation)
