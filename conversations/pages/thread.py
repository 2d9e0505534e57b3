"""The thread page and what can be done on it: send, regenerate, edit, switch versions,
settings, delete. Every action works as a plain form post; app.js streams where it can."""

import functools

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .. import services
from ..disconnects import run_while_connected
from ..errors import ChatError
from ..models import RATING_NAMES, Conversation, Message
from ..throttles import MessageRateThrottle, throttled
from .forms import ConversationSettingsForm, MessageForm

# The chats listed beside a thread (the list page has them all).
SIDEBAR_CHATS = 40


def owned_conversation(view):
    """A page view of one of the user's conversations, called with it in place of its id.
    Another user's conversation, like one that does not exist, is 404."""

    @functools.wraps(view)
    def with_conversation(request, conversation_id, **kwargs):
        owned = Conversation.objects.owned_by(request.user)
        return view(request, get_object_or_404(owned, pk=conversation_id), **kwargs)

    return with_conversation


def _back_to_thread(conversation):
    return redirect(conversation.get_absolute_url() + "#latest")


@login_required
@require_http_methods(["GET", "POST"])
@owned_conversation
@throttled(MessageRateThrottle)
def thread(request, conversation):
    form = MessageForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        content = form.cleaned_data["content"]
        _run_reply(
            request,
            lambda: services.open_message_stream(conversation=conversation, content=content),
        )
        return _back_to_thread(conversation)
    services.interrupt_dead_replies(conversation=conversation)
    messages = list(conversation.messages.active_path().with_versions().order_by("created_at"))
    last_question = next((m for m in reversed(messages) if m.role == Message.Role.USER), None)
    last_reply = messages[-1] if messages and messages[-1].role == Message.Role.ASSISTANT else None
    context = {
        "conversation": conversation,
        "messages_list": messages,
        "last_question": last_question,
        "last_reply": last_reply,
        "switchers": _version_switchers(last_question, last_reply),
        "form": form,
        "streaming": any(m.status == Message.Status.STREAMING for m in messages),
        "sidebar": services.recent_conversations(owner=request.user, limit=SIDEBAR_CHATS),
    }
    return render(request, "conversations/thread.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
@owned_conversation
@throttled(MessageRateThrottle)
def regenerate(request, conversation):
    _run_reply(request, lambda: services.regenerate(conversation=conversation))
    return _back_to_thread(conversation)


@login_required
@require_POST
@owned_conversation
@throttled(MessageRateThrottle)
def edit(request, conversation):
    form = MessageForm(request.POST)
    if not form.is_valid():
        flash.error(request, " ".join(form.errors["content"]))
    else:
        content = form.cleaned_data["content"]
        _run_reply(
            request,
            lambda: services.edit_last_message(conversation=conversation, content=content),
        )
    return _back_to_thread(conversation)


@login_required
@require_POST
@owned_conversation
def activate(request, conversation):
    try:
        message = conversation.messages.get(pk=request.POST.get("message"))
    except (Message.DoesNotExist, ValidationError) as exc:  # unknown or malformed id
        raise Http404("No such message in this conversation.") from exc
    try:
        services.activate_version(conversation=conversation, message=message)
    except ChatError as exc:
        flash.error(request, exc.detail)
    return _back_to_thread(conversation)


@login_required
@require_GET
@owned_conversation
def reply_context(request, conversation, message_id):
    """What the model read to write one reply: its system prompt, the turns it kept, and where
    older turns were dropped for room."""
    reply = get_object_or_404(conversation.messages, pk=message_id, role=Message.Role.ASSISTANT)
    context = {
        "conversation": conversation,
        "reply": reply,
        "recorded": services.reply_context(reply=reply),
    }
    return render(request, "conversations/context.html", context)


# What the feedback form's buttons say, as the ratings they mean.
RATINGS = {**RATING_NAMES, "clear": None}


@login_required
@require_POST
@owned_conversation
def feedback(request, conversation, message_id):
    """Thumbs up or down on a reply, with an optional comment; "clear" takes it back."""
    reply = get_object_or_404(conversation.messages, pk=message_id)
    choice = request.POST.get("rating", "")
    if choice not in RATINGS:
        flash.error(request, "Choose thumbs up or thumbs down.")
    else:
        try:
            services.rate_reply(
                reply=reply, rating=RATINGS[choice], feedback=request.POST.get("feedback")
            )
        except ChatError as exc:
            flash.error(request, exc.detail)
        else:
            flash.success(
                request,
                "Thanks: your feedback is saved." if choice != "clear" else "Feedback taken back.",
            )
    return redirect(conversation.get_absolute_url() + f"#m-{reply.pk}")


@login_required
@require_http_methods(["GET", "POST"])
@owned_conversation
def conversation_settings(request, conversation):
    form = ConversationSettingsForm(
        request.POST if request.method == "POST" else None, instance=conversation
    )
    if request.method == "POST" and form.is_valid():
        services.update_conversation(conversation=conversation, **form.cleaned_data)
        flash.success(request, "Settings saved.")
        return redirect(conversation)
    status = 400 if form.errors else 200
    return render(
        request,
        "conversations/settings.html",
        {"conversation": conversation, "form": form},
        status=status,
    )


@login_required
@require_http_methods(["GET", "POST"])
@owned_conversation
def delete(request, conversation):
    if request.method == "POST":
        title = conversation.display_title
        services.delete_conversation(conversation=conversation)
        flash.success(request, f"Deleted “{title}”.")
        return redirect(reverse("conversations:list"))
    count = conversation.messages.count()
    return render(
        request, "conversations/delete.html", {"conversation": conversation, "count": count}
    )


def _run_reply(request, start) -> None:
    """Write a reply to the end (without JavaScript the page waits for it); a failure is shown
    as a message on the thread, where the failed reply is listed too."""
    try:
        run_while_connected(request, start())
    except ChatError as exc:
        flash.error(request, exc.detail)


def _version_switchers(last_question, last_reply) -> dict:
    """For the last exchange: the previous and next versions of the question and of the reply,
    so the page can offer "< 1 / 2 >"."""
    switchers = {}
    for message in (last_question, last_reply):
        if message is None or message.versions < 2:
            continue
        siblings = list(
            Message.objects.filter(version_group=message.version_group)
            .order_by("created_at")
            .values_list("pk", flat=True)
        )
        index = siblings.index(message.pk)
        switchers[message.pk] = {
            "previous": siblings[index - 1] if index > 0 else None,
            "next": siblings[index + 1] if index + 1 < len(siblings) else None,
        }
    return switchers
