from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

app_name = "conversations"

urlpatterns = [
    path("", views.conversation_list, name="list"),
    path("new/", views.new_conversation, name="new"),
    path("c/<uuid:conversation_id>/", views.thread, name="thread"),
]

auth_urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
