from django.contrib.auth import views as auth_views
from django.urls import path

from . import views, views_thread, views_transfer

app_name = "conversations"

urlpatterns = [
    path("", views.conversation_list, name="list"),
    path("new/", views.new_conversation, name="new"),
    path("c/<uuid:conversation_id>/", views_thread.thread, name="thread"),
    path("c/<uuid:conversation_id>/regenerate/", views_thread.regenerate, name="regenerate"),
    path("c/<uuid:conversation_id>/edit/", views_thread.edit, name="edit"),
    path("c/<uuid:conversation_id>/activate/", views_thread.activate, name="activate"),
    path(
        "c/<uuid:conversation_id>/settings/",
        views_thread.conversation_settings,
        name="settings",
    ),
    path("c/<uuid:conversation_id>/delete/", views_thread.delete, name="delete"),
    path("c/<uuid:conversation_id>/export/", views_transfer.export, name="export"),
    path("import/", views_transfer.import_conversation, name="import"),
]

auth_urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
