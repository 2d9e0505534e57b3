"""What one user may keep: how many conversations, and how many bytes of text (messages and
system prompts). Generous by default; both are settings (CHATBOT_MAX_CONVERSATIONS,
CHATBOT_MAX_STORED_MB; 0 turns one off). Checked before anything new is stored; a reply the
model writes is never refused (its size is bounded by the reply budget)."""

from django.conf import settings
from django.db.models import Func, IntegerField, Sum

from .errors import ChatError
from .models import Conversation, Message


class TooManyConversations(ChatError):
    status_code = 409


class StorageFull(ChatError):
    status_code = 413


class TextBytes(Func):
    """The UTF-8 size of a text column."""

    function = "OCTET_LENGTH"
    output_field = IntegerField()

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(
            compiler, connection, template="LENGTH(CAST(%(expressions)s AS BLOB))", **extra
        )


def stored_bytes(owner) -> int:
    """The bytes of text `owner` keeps: every message and every system prompt."""
    messages = Message.objects.filter(conversation__owner=owner).aggregate(
        n=Sum(TextBytes("content"))
    )["n"]
    prompts = Conversation.objects.owned_by(owner).aggregate(n=Sum(TextBytes("system_prompt")))["n"]
    return (messages or 0) + (prompts or 0)


def check_room(*, owner, new_conversation: bool = False, texts: tuple[str, ...] = ()) -> None:
    """Raise TooManyConversations or StorageFull if storing a new conversation (when
    `new_conversation`) and `texts` would take `owner` past a limit."""
    limit = settings.CHATBOT_MAX_CONVERSATIONS
    if new_conversation and limit > 0:
        count = Conversation.objects.owned_by(owner).count()
        if count >= limit:
            raise TooManyConversations(
                f"You have {count} conversations; the limit is {limit} conversations per user. "
                "Delete some to start or import another."
            )
    limit = settings.CHATBOT_MAX_STORED_BYTES
    if limit > 0:
        adding = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        used = stored_bytes(owner)
        if used + adding > limit:
            raise StorageFull(
                f"This would store {adding} bytes of text; you keep {used} bytes and the limit is "
                f"{limit} bytes per user. Delete conversations you no longer need to make room."
            )
