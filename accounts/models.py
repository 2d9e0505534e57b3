from django.conf import settings
from django.db import models


class ApiKey(models.Model):
    """A key a user's programs send to the API. Only its digest is stored: the key itself is
    shown once, when it is made. A user may hold several, each with a name."""

    NAME_MAX_LENGTH = 100
    PREFIX_LENGTH = 8  # shown so that a person can tell their keys apart

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=NAME_MAX_LENGTH)
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the key, in hex.")
    prefix = models.CharField(max_length=PREFIX_LENGTH)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"


class TokenQuota(models.Model):
    """How many tokens (prompt and reply, summed over the replies written for them) a user may
    spend a day, set by staff in the admin. A user without one has the server's default
    (CHATBOT_TOKENS_PER_DAY, unlimited unless set)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="token_quota"
    )
    tokens_per_day = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Empty: the server's default (CHATBOT_TOKENS_PER_DAY). 0: unlimited.",
    )

    class Meta:
        verbose_name = "token quota"

    def __str__(self):
        return (
            f"{self.user}: {self.tokens_per_day if self.tokens_per_day is not None else 'default'}"
        )
