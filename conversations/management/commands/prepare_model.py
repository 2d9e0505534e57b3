import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from conversations.llm.interface import GenerationParams
from conversations.llm.loading import ModelUnavailable, bundled_cache_dir, prepare_bundled_model
from conversations.llm.remote import EngineUnavailable
from conversations.runtime import get_engine

SMOKE_PROMPT = "What is the capital of France?"


class Command(BaseCommand):
    help = (
        "Get the configured model ready: convert the bundled GGUF into the cache once, load it, "
        "and run a one-line smoke generation (with CHATBOT_ENGINE_URL: ask the inference server "
        "instead)."
    )

    def handle(self, *args, **options):
        engine = get_engine()
        if settings.CHATBOT_ENGINE_URL:
            self.check_server(engine)
        else:
            self.prepare_embedded(engine)
        self.smoke_test(engine)

    def check_server(self, engine):
        try:
            served = engine.load()
        except (EngineUnavailable, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Inference server {settings.CHATBOT_ENGINE_URL} serves {served.name}: a window of "
            f"{served.window} tokens, counted by {served.counter.name}"
        )

    def prepare_embedded(self, engine):
        try:
            if not settings.CHATBOT_MODEL:
                cache = bundled_cache_dir(settings.CHATBOT_MODEL_CACHE)
                had_cache = cache.is_dir()
                started = time.perf_counter()
                prepare_bundled_model(settings.CHATBOT_MODEL_CACHE)
                if had_cache:
                    self.stdout.write(f"Model cache: {cache} (already prepared)")
                else:
                    took = time.perf_counter() - started
                    self.stdout.write(f"Model cache: {cache} (converted from GGUF in {took:.1f} s)")
            loaded = engine.load()
        except ModelUnavailable as exc:
            raise CommandError(str(exc)) from exc
        kind = "seq2seq" if loaded.is_seq2seq else "causal"
        self.stdout.write(
            f"Loaded {loaded.name} ({kind}) from {loaded.source_dir} in {loaded.load_seconds:.1f} s"
        )

    def smoke_test(self, engine):
        messages = [
            {"role": "system", "content": settings.CHATBOT_SYSTEM_PROMPT},
            {"role": "user", "content": SMOKE_PROMPT},
        ]
        try:
            generation = engine.generate(messages, GenerationParams(max_new_tokens=24))
        except EngineUnavailable as exc:
            raise CommandError(str(exc)) from exc
        rate = generation.completion_tokens / max(generation.total_ms / 1000, 1e-6)
        self.stdout.write(
            f"Smoke test: {SMOKE_PROMPT!r} -> {generation.text!r} "
            f"({generation.completion_tokens} tokens, {rate:.1f} tok/s)"
        )
        self.stdout.write(self.style.SUCCESS("Model ready."))
