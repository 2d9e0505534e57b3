"""What one user may keep: how many conversations, and how many bytes of text (messages and
system prompts). Generous by default; both are settings (CHATBOT_MAX_CONVERSATIONS,
CHATBOT_MAX_STORED_MB; 0 turns one off). Checked before anything new is stored; a reply the
model writes is never refused (its size is bounded by the reply budget).

And what one user may spend: tokens a day (prompt and reply, summed over the replies written
that day in TIME_ZONE), their own quota (accounts.TokenQuota) or CHATBOT_TOKENS_PER_DAY.
Checked before a reply is reserved; a reply counts once it has ended (its counts are saved
then), and one started under the quota is written whole."""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django.conf import settings
from django.db.models import Count, F, Func, IntegerField, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from accounts.models import TokenQuota

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


class OverTokenQuota(ChatError):
    status_code = 429

    def __init__(self, detail: str, *, resets_at: datetime) -> None:
        super().__init__(detail)
        self.resets_at = resets_at

    @property
    def retry_after(self) -> int:
        """Seconds until the quota resets (for the Retry-After header)."""
        return max(1, int((self.resets_at - timezone.now()).total_seconds()) + 1)


@dataclass(frozen=True)
class TokenUsage:
    used: int  # tokens of today's replies
    limit: int | None  # None: unlimited
    resets_at: datetime  # the next midnight in TIME_ZONE

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def _midnight(day: date) -> datetime:
    """The start of `day` in TIME_ZONE (days are not all 24 h long where clocks change)."""
    return timezone.make_aware(datetime.combine(day, time()))


def _today() -> tuple[datetime, datetime]:
    """Today's start and the next day's, in TIME_ZONE."""
    today = timezone.localdate()
    return _midnight(today), _midnight(today + timedelta(days=1))


def _reply_tokens():
    return Coalesce(F("prompt_tokens"), 0) + Coalesce(F("completion_tokens"), 0)


def token_limit(owner_id) -> int | None:
    """`owner`'s tokens a day: their own quota, else the server's; None: unlimited."""
    own = TokenQuota.objects.filter(user_id=owner_id).values_list("tokens_per_day", flat=True)
    chosen = next(iter(own), None)
    limit = settings.CHATBOT_TOKENS_PER_DAY if chosen is None else chosen
    return limit or None


def _used_since(owner_id, start: datetime) -> int:
    return (
        Message.objects.filter(
            conversation__owner_id=owner_id, role=Message.Role.ASSISTANT, created_at__gte=start
        ).aggregate(n=Sum(_reply_tokens()))["n"]
        or 0
    )


def token_usage(owner_id) -> TokenUsage:
    start, resets_at = _today()
    return TokenUsage(
        used=_used_since(owner_id, start), limit=token_limit(owner_id), resets_at=resets_at
    )


def daily_tokens(owner_id, days: int) -> list[tuple[date, int, int]]:
    """`owner`'s last `days` days, newest first: (day, tokens, replies), days without replies
    too (one query)."""
    today = timezone.localdate()
    first = _midnight(today - timedelta(days=days - 1))
    rows = (
        Message.objects.filter(
            conversation__owner_id=owner_id, role=Message.Role.ASSISTANT, created_at__gte=first
        )
        .annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()))
        .values("day")
        .annotate(tokens=Sum(_reply_tokens()), replies=Count("pk"))
    )
    found = {row["day"]: (row["tokens"] or 0, row["replies"]) for row in rows}
    result = []
    for back in range(days):
        day = today - timedelta(days=back)
        tokens, replies = found.get(day, (0, 0))
        result.append((day, tokens, replies))
    return result


def check_tokens(owner_id) -> None:
    """Raise OverTokenQuota if `owner` has spent their tokens for today. (Unlimited, the
    usual case, costs one query: the user's own quota.)"""
    limit = token_limit(owner_id)
    if limit is None:
        return
    start, resets_at = _today()
    used = _used_since(owner_id, start)
    if used < limit:
        return
    resets = timezone.localtime(resets_at)
    hours, rest = divmod(int((resets_at - timezone.now()).total_seconds()), 3600)
    raise OverTokenQuota(
        f"You have used {used} of your {limit} tokens for today. The quota resets at "
        f"{resets:%H:%M} {resets.tzname()} (in {hours} h {rest // 60} min); staff can raise it.",
        resets_at=resets_at,
    )
