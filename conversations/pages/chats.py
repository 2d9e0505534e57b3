"""The chat list: browsing and searching one's chats, and starting a new one."""

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from .. import services
from ..disconnects import run_while_connected
from ..errors import ChatError
from ..models import Conversation
from ..search import MAX_QUERY_CHARS, search_conversations
from ..throttles import ConversationRateThrottle, MessageRateThrottle, throttled
from .forms import NewConversationForm

CONVERSATIONS_PER_PAGE = 30


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
    context = {"page": page, "form": form, "query": query, "max_query_chars": MAX_QUERY_CHARS}
    return render(request, "conversations/list.html", context, status=status)
