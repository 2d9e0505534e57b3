from django.contrib import admin
from django.db.models import Count
from django.template.defaultfilters import truncatechars

from .models import REPLY_COUNTS, Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "status", "content", "error", "model", *REPLY_COUNTS)
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
    list_filter = (("api_key", admin.EmptyFieldListFilter), "created_at", "updated_at")
    search_fields = ("title", "owner__username", "messages__content")
    readonly_fields = ("id", "owner", "api_key", "created_at", "updated_at")
    fields = ("id", "owner", "api_key", "title", "system_prompt", "created_at", "updated_at")
    date_hierarchy = "updated_at"
    inlines = [MessageInline]

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
    )
    list_select_related = ("conversation", "conversation__owner")
    list_filter = ("role", "status", "model", "created_at")
    search_fields = ("content", "conversation__title", "conversation__owner__username")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    readonly_fields = [f.name for f in Message._meta.fields]

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
