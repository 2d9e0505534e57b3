"""The seam between Django and the generation layer: the process's ChatEngine.

The engine is built from settings on first use and shared by every thread of the process.
Importing this module imports no torch: the engine loads its model only when first asked.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from .llm.interface import ChatEngine, GenerationParams
    from .llm.prefix_cache import CacheKey
    from .models import Conversation

_engine: ChatEngine | None = None
_engine_lock = threading.Lock()


def get_engine() -> ChatEngine:
    """The process's one engine: the embedded one (llm/engine.py), one that asks an inference
    server (llm/remote.py, with CHATBOT_ENGINE_URL), or a test's replacement."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = _build_engine()
    return _engine


def _build_engine() -> ChatEngine:
    if settings.CHATBOT_ENGINE_URL:
        from .llm.remote import RemoteEngine

        return RemoteEngine(
            base_url=settings.CHATBOT_ENGINE_URL,
            model=settings.CHATBOT_ENGINE_MODEL,
            api_key=settings.CHATBOT_ENGINE_API_KEY,
            context_tokens=settings.CHATBOT_CONTEXT_TOKENS,
            tokenizer=settings.CHATBOT_TOKENIZER,
            connect_timeout=settings.CHATBOT_ENGINE_CONNECT_TIMEOUT,
            read_timeout=settings.CHATBOT_ENGINE_READ_TIMEOUT,
        )
    from .llm.engine import Engine

    return Engine(
        model=settings.CHATBOT_MODEL,
        cache_dir=settings.CHATBOT_MODEL_CACHE,
        context_tokens=settings.CHATBOT_CONTEXT_TOKENS,
        torch_threads=settings.CHATBOT_TORCH_THREADS,
        prefix_cache_bytes=settings.CHATBOT_PREFIX_CACHE_MB * 2**20,
        batch_bytes=settings.CHATBOT_BATCH_MEMORY_MB * 2**20,
        token_cache_bytes=settings.CHATBOT_TOKEN_CACHE_MB * 2**20,
        weights=settings.CHATBOT_WEIGHTS,
        max_batch=settings.CHATBOT_BATCH_SIZE,
        native_kernels=settings.CHATBOT_NATIVE_KERNELS,
        shared_system_prompt=settings.CHATBOT_SYSTEM_PROMPT,
    )


def cache_key(conversation: Conversation) -> CacheKey:
    """The engine's key for what it keeps of a conversation's turns: the conversation and its
    owner (a new conversation reuses only its owner's, see llm/prefix_cache.py)."""
    from .llm.prefix_cache import CacheKey

    return CacheKey(owner=str(conversation.owner_id), conversation=str(conversation.pk))


def forget_cached_turns(conversation_id: object) -> None:
    """Drop what the engine keeps of a conversation whose text was deleted. Nothing to do when
    this process has built no engine yet."""
    if _engine is not None:
        _engine.forget(str(conversation_id))


def set_engine(engine: ChatEngine | None) -> ChatEngine | None:
    """Replace the process's engine (tests of the web layer do this); returns the previous one."""
    global _engine
    with _engine_lock:
        previous, _engine = _engine, engine
    return previous


def default_generation_params() -> GenerationParams:
    from .llm.interface import GenerationParams

    return GenerationParams(
        max_new_tokens=settings.CHATBOT_MAX_NEW_TOKENS,
        temperature=settings.CHATBOT_TEMPERATURE,
        top_p=settings.CHATBOT_TOP_P,
        repetition_penalty=settings.CHATBOT_REPETITION_PENALTY,
    )
