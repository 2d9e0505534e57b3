from django.contrib import admin
from django.urls import include, path

from chatsite import health, metrics
from conversations.admin_insights import insights_page
from conversations.pages.auth import admin_login
from conversations.pages.urls import auth_urlpatterns

urlpatterns = [
    # For load balancers: unauthenticated, and exempt from the HTTPS redirect (settings.py).
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    # For Prometheus: 404 unless CHATBOT_METRICS is on (chatsite/metrics.py).
    path("metrics", metrics.metrics_view, name="metrics"),
    path("admin/login/", admin_login),  # before the admin's own route to it
    # Staff only (admin_view); before the admin's routes, whose catch-all would answer 404.
    path("admin/insights/", insights_page, name="admin_insights"),
    path("admin/", admin.site.urls),
    path("api/", include("conversations.api.urls")),
    # OpenAI's API, for its clients: their base URL is http://host/v1.
    path("v1/", include("conversations.openai_api.urls")),
    path("accounts/", include(auth_urlpatterns)),
    path("", include("conversations.pages.urls")),
]

# A wrong URL under /api/ (an unknown path, or an id that is not a UUID) answers in JSON.
handler404 = "conversations.api.errors.page_not_found"
