"""Signing up and in: the sign-up page, and the login pages (the site's and the admin's) with
sign-in attempts limited."""

from django.contrib import admin
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import UserCreationForm
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_http_methods

from ..throttles import limit_sign_ins


@require_http_methods(["GET", "POST"])
@limit_sign_ins
def signup(request):
    if request.user.is_authenticated:
        return redirect("conversations:list")
    form = UserCreationForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("conversations:list")
    return render(request, "registration/signup.html", {"form": form})


class LoginView(auth_views.LoginView):
    """Django's login page, with sign-in attempts limited per client address and username."""

    redirect_authenticated_user = True

    @method_decorator(limit_sign_ins)
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


# The admin's own login page, under the same limits.
admin_login = limit_sign_ins(admin.site.login)
