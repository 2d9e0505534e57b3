"""The usage page: a user's tokens today against their daily quota, and their last days."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.views.decorators.http import require_GET

from .. import services


@login_required
@require_GET
def usage(request):
    today, days = services.token_usage(owner=request.user)
    return render(request, "conversations/usage.html", {"today": today, "days": days})
