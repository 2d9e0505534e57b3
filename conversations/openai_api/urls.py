from django.urls import path

from . import views

urlpatterns = [
    path("models", views.ModelList.as_view(), name="openai-models"),
    # A model's name may hold slashes (an organisation/name of the Hugging Face Hub).
    path("models/<path:model>", views.ModelDetail.as_view(), name="openai-model"),
    path("chat/completions", views.ChatCompletions.as_view(), name="openai-chat-completions"),
]
