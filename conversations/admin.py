from django.contrib import admin
from django.db.models import Count
from django.template.defaultfilters import pluralize, truncatechars
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from . import services
from .datasets import dataset_download
from .models import REPLY_COUNTS, Conversation, Message


# The dataset downloads (datasets.py), an action of both lists: of the chosen conversations, or
# of the chosen messages alone, by their conversation.
@admin.action(description="Export as fine-tuning dataset (JSONL)")
def export_dataset(modeladmin, request, queryset):
    return dataset_download(queryset)


@admin.action(description="Export as fine-tuning dataset, rated-up replies only (JSONL)")
def export_rated_up_dataset(modeladmin, request, queryset):
    return dataset_download(queryset, rated_up_only=True)


class FeedbackFilter(admin.SimpleListFilter):
    """Conversations by their replies' ratings (Message.rating)."""

    title = "feedback"
    parameter_name = "feedback"
    RATED = {"up": Message.Rating.UP, "down": Message.Rating.DOWN}

    def lookups(self, request, model_admin):
        return [
            ("up", "Has a reply rated up"),
            ("down", "Has a reply rated down"),
            ("any", "Has rated replies"),
        ]

    def queryset(self, request, queryset):
        value = self.value()
        if value in self.RATED:
            rated = Message.objects.filter(rating=self.RATED[value])
        elif value == "any":
            rated = Message.objects.filter(rating__isnull=False)
        else:
            return queryset
        return queryset.filter(pk__in=rated.values("conversation_id"))


class MessageInline(admin.TabularInline):
    model = Message
    fields = (
        "created_at",
        "role",
        "status",
        "content",
        "error",
        "model",
        *REPLY_COUNTS,
        "rating",
        "feedback",
    )
    readonly_fields = fields
    ordering = ("created_at",)
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("display_title", "owner", "message_count", "created_at", "updated_at")
    list_select_related = ("owner",)
    # "Sent by a program": conversations sent whole through /v1/chat/completions.
    list_filter = (
        ("api_key", admin.EmptyFieldListFilter),
        FeedbackFilter,
        "created_at",
        "updated_at",
    )
    search_fields = ("title", "owner__username", "messages__content")
    readonly_fields = ("id", "owner", "api_key", "created_at", "updated_at")
    fields = ("id", "owner", "api_key", "title", "system_prompt", "created_at", "updated_at")
    date_hierarchy = "updated_at"
    inlines = [MessageInline]
    actions = (export_dataset, export_rated_up_dataset)

    def get_queryset(self, request):
        # distinct: a search on message text joins messages again, which would multiply the count.
        return (
            super().get_queryset(request).annotate(message_count=Count("messages", distinct=True))
        )

    @admin.display(description="Title", ordering="title")
    def display_title(self, obj):
        return obj.display_title

    @admin.display(description="Messages (all versions)", ordering="message_count")
    def message_count(self, obj):
        return obj.message_count

    def get_search_results(self, request, queryset, search_term):
        queryset, _ = super().get_search_results(request, queryset, search_term)
        # Searching message text joins many rows per conversation: collapse them.
        return queryset, True


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "conversation_title",
        "owner",
        "role",
        "status",
        "short_content",
        "model",
        *REPLY_COUNTS,
        "rating",
    )
    list_select_related = ("conversation", "conversation__owner")
    list_filter = ("role", "status", "rating", "model", "created_at")
    search_fields = ("content", "conversation__title", "conversation__owner__username")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    readonly_fields = [*(f.name for f in Message._meta.fields), "what_the_model_read"]
    actions = (export_dataset, export_rated_up_dataset)

    def has_add_permission(self, request):
        return False

    @admin.display(description="Conversation", ordering="conversation__title")
    def conversation_title(self, obj):
        return obj.conversation.display_title

    @admin.display(description="Owner", ordering="conversation__owner__username")
    def owner(self, obj):
        return obj.conversation.owner

    @admin.display(description="Content")
    def short_content(self, obj):
        return truncatechars(obj.content or obj.error, 80)

    @admin.display(description="What the model read")
    def what_the_model_read(self, obj):
        """A reply's context record (context.recorded_context) as the thread's context page
        shows it: the system prompt, a marker for the turns dropped, the messages kept."""
        recorded = services.reply_context(reply=obj) if obj.role == Message.Role.ASSISTANT else None
        if recorded is None:
            return "No record (a user message, or a reply written before replies kept one)."
        rows = [
            format_html(
                "<li><strong>System prompt:</strong> {}</li>", recorded.system_prompt or "none"
            )
        ]
        if recorded.dropped:
            rows.append(
                format_html(
                    "<li><em>{} older message{} left out: they did not fit.</em></li>",
                    recorded.dropped,
                    pluralize(recorded.dropped),
                )
            )
        for message in recorded.messages:
            if message is None:
                rows.append(format_html("<li><em>{}</em></li>", "A message deleted since."))
                continue
            link = reverse("admin:conversations_message_change", args=[message.pk])
            rows.append(
                format_html(
                    '<li><a href="{}">{}</a>: {}</li>',
                    link,
                    message.get_role_display(),
                    truncatechars(message.content, 300),
                )
            )
        return format_html("<ol>{}</ol>", format_html_join("", "{}", ((row,) for row in rows)))
