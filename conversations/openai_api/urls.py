from django.urls import path

from . import conversation_views, response_views, views

urlpatterns = [
    path("models", views.ModelList.as_view(), name="openai-models"),
    # A model's name may hold slashes (an organisation/name of the Hugging Face Hub).
    path("models/<path:model>", views.ModelDetail.as_view(), name="openai-model"),
    path("chat/completions", views.ChatCompletions.as_view(), name="openai-chat-completions"),
    path("responses", response_views.Responses.as_view(), name="openai-responses"),
    path("responses/<str:response_id>", response_views.ResponseDetail.as_view()),
    path("responses/<str:response_id>/input_items", response_views.ResponseInputItems.as_view()),
    path("conversations", conversation_views.Conversations.as_view()),
    path("conversations/<str:conversation_id>", conversation_views.ConversationDetail.as_view()),
    path(
        "conversations/<str:conversation_id>/items",
        conversation_views.ConversationItems.as_view(),
    ),
    path(
        "conversations/<str:conversation_id>/items/<str:item_id>",
        conversation_views.ConversationItem.as_view(),
    ),
]
