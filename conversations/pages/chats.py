from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_http_methods, require_POST

from .. import services
from ..disconnects import run_while_connected
from ..errors import ChatError
from ..models import Conversation
from ..search import search_conversations
from ..throttles import ConversationRateThrottle, MessageRateThrottle, limit_sign_ins, throttled
from .forms import NewConversationForm

CONVERSATIONS_PER_PAGE = 30


@require_http_methods(["GET", "POST"])
@limit_sign_ins
def signup(request):
    if request.user.is_authenticated:
        return redirect("conversations:list")
    form = UserCreationForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("conversations:list")
    return render(request, "registration/signup.html", {"form": form})


@login_required
@require_http_methods(["GET"])
def conversation_list(request):
    query = request.GET.get("q", "").strip()
    if query:  # best match first, each with a snippet
        conversations = search_conversations(owner=request.user, query=query)
    else:
        conversations = Conversation.objects.listed_for(request.user)
    return _list_page(request, conversations, form=NewConversationForm(), query=query)


@login_required
@require_POST
@throttled(MessageRateThrottle, ConversationRateThrottle)
def new_conversation(request):
    form = NewConversationForm(request.POST)
    if not form.is_valid():
        conversations = Conversation.objects.listed_for(request.user)
        return _list_page(request, conversations, form=form, status=400)
    try:
        writer = services.open_new_conversation(
            owner=request.user,
            content=form.cleaned_data["content"],
            system_prompt=form.cleaned_data["system_prompt"],
        )
    except ChatError as exc:  # refused before anything was stored (too many replies at once)
        flash.error(request, exc.detail)
        return redirect("conversations:list")
    try:
        run_while_connected(request, writer)
    except ChatError as exc:
        flash.error(request, exc.detail)
    return redirect(writer.conversation)


def _list_page(request, conversations, *, form, query: str = "", status: int = 200):
    page = Paginator(conversations, CONVERSATIONS_PER_PAGE).get_page(request.GET.get("page"))
    context = {"page": page, "form": form, "query": query}
    return render(request, "conversations/list.html", context, status=status)


class LoginView(auth_views.LoginView):
    """Django's login page, with sign-in attempts limited per client address and username."""

    redirect_authenticated_user = True

    @method_decorator(limit_sign_ins)
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


# The admin's own login page, under the same limits.
admin_login = limit_sign_ins(admin.site.login)
