from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .models import ApiKey, TokenQuota


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are listed and may be revoked (deleted); none is made or read here, as only their
    digests are stored."""

    list_display = ["name", "prefix", "user", "created", "last_used"]
    list_select_related = ["user"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["user", "name", "prefix", "digest", "created", "last_used"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class TokenQuotaInline(admin.StackedInline):
    model = TokenQuota
    can_delete = True
    extra = 0
    max_num = 1


@admin.register(TokenQuota)
class TokenQuotaAdmin(admin.ModelAdmin):
    """Per-user daily token quotas; also set on each user's page."""

    list_display = ["user", "tokens_per_day"]
    list_select_related = ["user"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class UserWithQuotaAdmin(UserAdmin):
    """Django's user admin, with the user's daily token quota."""

    inlines = [*UserAdmin.inlines, TokenQuotaInline]
