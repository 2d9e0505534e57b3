from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.routers import DefaultRouter

from accounts.views import TokenView

from .exports import ConversationExportView
from .imports import ConversationImportView
from .usage import UsageView
from .views import ConversationViewSet, StartMessageView

router = DefaultRouter()
router.register("conversations", ConversationViewSet, basename="conversation")

urlpatterns = [
    path("token/", TokenView.as_view(), name="api-token"),
    path("messages/", StartMessageView.as_view(), name="api-messages"),
    path("usage/", UsageView.as_view(), name="api-usage"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # The split view serves Swagger UI's init script at its own URL: the Content-Security-Policy
    # allows no inline script.
    path(
        "docs/",
        SpectacularSwaggerSplitView.as_view(url_name="api-schema", template_name="api_docs.html"),
        name="api-docs",
    ),
    path("conversations/import/", ConversationImportView.as_view(), name="api-conversation-import"),
    path(
        "conversations/<uuid:pk>/export/",
        ConversationExportView.as_view(),
        name="api-conversation-export",
    ),
    path("", include(router.urls)),
]
