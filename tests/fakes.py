"""A stand-in engine for tests of the web layer. The real engine and model are tested in
test_engine_*.py and test_end_to_end.py."""

from conversations.llm.engine import Generation


class FakeEngine:
    """Counts a token per word and echoes the last user message; can be told to fail."""

    model_name = "fake-echo"

    def __init__(self, *, context_window: int = 4096, fail_with: Exception | None = None):
        self.window = context_window
        self.fail_with = fail_with
        self.calls: list[list[dict]] = []

    def prompt_budget(self, params) -> int:
        return self.window - params.max_new_tokens

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"].split()) + 2 for m in messages)

    def generate(self, messages: list[dict], params) -> Generation:
        self.calls.append(messages)
        if self.fail_with is not None:
            raise self.fail_with
        text = f"Echo: {messages[-1]['content']}"
        return Generation(
            text=text,
            prompt_tokens=self.count_tokens(messages),
            completion_tokens=len(text.split()),
            ttft_ms=5,
            total_ms=20,
            finish_reason="stop",
        )
