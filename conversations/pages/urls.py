from django.contrib.auth import views as auth_views
from django.urls import path

from . import auth, chats, exports, imports, keys, theme, thread, usage

app_name = "conversations"

urlpatterns = [
    path("", chats.conversation_list, name="list"),
    path("new/", chats.new_conversation, name="new"),
    path("c/<uuid:conversation_id>/", thread.thread, name="thread"),
    path("c/<uuid:conversation_id>/regenerate/", thread.regenerate, name="regenerate"),
    path("c/<uuid:conversation_id>/edit/", thread.edit, name="edit"),
    path("c/<uuid:conversation_id>/activate/", thread.activate, name="activate"),
    path(
        "c/<uuid:conversation_id>/settings/",
        thread.conversation_settings,
        name="settings",
    ),
    path("c/<uuid:conversation_id>/delete/", thread.delete, name="delete"),
    path(
        "c/<uuid:conversation_id>/m/<uuid:message_id>/context/",
        thread.reply_context,
        name="context",
    ),
    path(
        "c/<uuid:conversation_id>/m/<uuid:message_id>/feedback/",
        thread.feedback,
        name="feedback",
    ),
    path("c/<uuid:conversation_id>/export/", exports.export, name="export"),
    path("import/", imports.import_conversation, name="import"),
    path("keys/", keys.api_keys, name="keys"),
    path("usage/", usage.usage, name="usage"),
    path("theme/", theme.choose_theme, name="theme"),
    path("keys/<int:key_id>/revoke/", keys.revoke_key, name="revoke-key"),
]

auth_urlpatterns = [
    path("signup/", auth.signup, name="signup"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
