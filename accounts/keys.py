"""API keys: made, found, revoked. A key is random, so one SHA-256 (no salt, no slow hash)
keeps it as safe as it is while letting a request find its row by the digest."""

import hashlib
import secrets
from datetime import timedelta

from django.utils import timezone

from .models import ApiKey

# How stale last_used may get: writing it at every request would cost a write per request.
LAST_USED_PRECISION = timedelta(minutes=1)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def issue_key(*, user, name: str, key: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `user`: its row and the key, which is not stored and cannot be shown
    again. (`key` is for scripts that seed a known one.)"""
    key = key or secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        user=user,
        name=name[: ApiKey.NAME_MAX_LENGTH],
        digest=digest(key),
        prefix=key[: ApiKey.PREFIX_LENGTH],
    )
    return api_key, key


def find_key(key: str) -> ApiKey | None:
    """The row of `key` (with its user), noting its use, or None for a key that is not one."""
    api_key = ApiKey.objects.select_related("user").filter(digest=digest(key)).first()
    if api_key is not None:
        now = timezone.now()
        if api_key.last_used is None or now - api_key.last_used > LAST_USED_PRECISION:
            ApiKey.objects.filter(pk=api_key.pk).update(last_used=now)
            api_key.last_used = now
    return api_key


def revoke_key(api_key: ApiKey) -> None:
    api_key.delete()


def revoke_all_keys(*, user) -> int:
    """Revoke every key of `user`; how many there were."""
    deleted, _ = ApiKey.objects.filter(user=user).delete()
    return deleted
