"""Reading settings from the environment: for settings.py, and for gunicorn.conf.py, which reads
a few before Django starts.

A value the server cannot read stops it at start, with the variable named: a typo must not
quietly turn into a default (DJANGO_DEBUG=ture, CHATBOT_BATCH_SIZE=8x).
"""

import math
import os

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    value = env_str(name)
    if not value:
        return default
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(
        f"{name} must be true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}), "
        f"got {value!r}."
    )


def env_int(name: str, default: int) -> int:
    value = env_str(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {value!r}.") from None


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}.")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r}: use one of {', '.join(choices)}.")
    return value


def env_kernels(name: str) -> str:
    """Which kernels of our own to use: `true` (the best the CPU has), `false` (torch's), or an
    instruction set by name (`avx2`, `avx2-vnni`, `avx512`: conversations.llm.native.TARGETS,
    not imported here since a server relaying to an inference server imports no torch)."""
    value = env_str(name).lower()
    if not value or value in TRUE_WORDS:
        return "true"
    if value in FALSE_WORDS:
        return "false"
    if value in ("avx2", "avx2-vnni", "avx512"):
        return value
    raise ImproperlyConfigured(f"{name}={value!r}: use true, false, avx2, avx2-vnni or avx512.")


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_batch_size() -> int:
    """CHATBOT_BATCH_SIZE: conversations answered together, one token each per decode step; more
    wait their turn. gunicorn sizes its threads to it."""
    return max(1, env_int("CHATBOT_BATCH_SIZE", 8))
