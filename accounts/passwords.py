from .keys import revoke_all_keys


class RevokeKeysOnPasswordChange:
    """A password changed revokes the user's API keys, as it ends their other sessions.

    Listed among AUTH_PASSWORD_VALIDATORS for Django's `password_changed` hook: it runs when a
    password is set (admin, `changepassword`, password forms) and not when Django only rehashes
    the same password at sign-in, which a signal on the user's row could not tell apart.
    """

    def validate(self, password, user=None):
        pass  # it judges no password

    def password_changed(self, password, user=None):
        if user is not None and user.pk is not None:
            revoke_all_keys(user=user)

    def get_help_text(self):
        # Shown with the password rules, where a person sets a password.
        return "Setting a new password revokes your API keys."
