"""Domain errors. Each carries the HTTP status it maps to: the API answers with it in one place
(api/errors.py); the pages show the error's detail as a message on the page they lead to."""


class ChatError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, exchange=None) -> None:
        super().__init__(detail)
        self.detail = detail
        # The rows saved before the failure, so callers can show what was kept.
        self.exchange = exchange


class InvalidInput(ChatError):
    """What was sent cannot be taken as it is (the detail says why)."""

    status_code = 400


class Conflict(ChatError):
    """The conversation is not in a state that allows this (a reply is still being written,
    there is nothing to regenerate, ...)."""

    status_code = 409


class TooManyReplies(ChatError):
    """The user already has as many replies being written as one user may have at once."""

    status_code = 429


class GenerationFailed(ChatError):
    """The model could not write a reply. The user message is saved; so is the failed reply."""

    status_code = 503


class ContextOverflow(ChatError):
    """The system prompt and the new message alone exceed what the model can read."""

    status_code = 422

    def __init__(self, *, prompt_tokens: int, budget: int, exchange=None) -> None:
        super().__init__(
            f"The message and system prompt take {prompt_tokens} tokens, but the model reads "
            f"at most {budget} tokens of prompt (its context window minus the reply budget). "
            "Shorten the message or the system prompt.",
            exchange=exchange,
        )
        self.prompt_tokens = prompt_tokens
        self.budget = budget
