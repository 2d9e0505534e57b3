from django.contrib import admin
from django.urls import include, path

from conversations.urls import auth_urlpatterns
from conversations.views import admin_login

urlpatterns = [
    path("admin/login/", admin_login),  # before the admin's own route to it
    path("admin/", admin.site.urls),
    path("api/", include("conversations.api.urls")),
    path("accounts/", include(auth_urlpatterns)),
    path("", include("conversations.urls")),
]

# A wrong URL under /api/ (an unknown path, or an id that is not a UUID) answers in JSON.
handler404 = "conversations.api.errors.page_not_found"
