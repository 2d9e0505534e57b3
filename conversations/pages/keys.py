"""API keys on a page: a user names a new key, which is shown once (only its digest is kept),
sees each key's name, start and last use, and revokes one. The token endpoint's keys are
listed here too: they are the same keys."""

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from accounts import keys
from accounts.models import ApiKey

from .forms import NewKeyForm


@login_required  # (so its answers, a new key among them, are no-store: chatsite/headers.py)
@require_http_methods(["GET", "POST"])
def api_keys(request):
    form = NewKeyForm(request.POST if request.method == "POST" else None)
    new_key = None
    if request.method == "POST" and form.is_valid():
        # Shown in this answer, not after a redirect: the key would have to wait in the session
        # (in the database) for the next page.
        _, new_key = keys.issue_key(user=request.user, name=form.cleaned_data["name"])
        form = NewKeyForm()
    context = {"form": form, "new_key": new_key, "keys": request.user.api_keys.all()}
    return render(request, "conversations/keys.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def revoke_key(request, key_id: int):
    api_key = get_object_or_404(ApiKey, pk=key_id, user=request.user)
    keys.revoke_key(api_key)
    flash.success(request, f"Revoked “{api_key}”: programs that send it are refused from now on.")
    return redirect("conversations:keys")
