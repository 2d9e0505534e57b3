from django.contrib import admin
from django.urls import include, path

from conversations.pages.auth import admin_login
from conversations.pages.urls import auth_urlpatterns

urlpatterns = [
    path("admin/login/", admin_login),  # before the admin's own route to it
    path("admin/", admin.site.urls),
    path("api/", include("conversations.api.urls")),
    path("accounts/", include(auth_urlpatterns)),
    path("", include("conversations.pages.urls")),
]

# A wrong URL under /api/ (an unknown path, or an id that is not a UUID) answers in JSON.
handler404 = "conversations.api.errors.page_not_found"
