import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Func, OuterRef, Subquery
from django.utils import timezone

from .validators import clean_title


def _between(low, high) -> list:
    return [MinValueValidator(low), MaxValueValidator(high)]


class ConversationQuerySet(models.QuerySet):
    def owned_by(self, user):
        """`user`'s conversations: the only ones their requests see or touch (any other id is
        404, as if it did not exist)."""
        return self.filter(owner=user)

    def listed_for(self, user):
        """`user`'s conversations as their list shows them: the most recently active first,
        each with its `message_count`."""
        return self.owned_by(user).with_message_counts().order_by("-updated_at")

    def with_message_counts(self):
        """Annotate `message_count`: the messages the thread shows (the chosen versions).

        A correlated subquery rather than a join and GROUP BY: the database counts only for the
        rows it returns (a page), not for every conversation of the owner."""
        shown = Message.objects.filter(conversation=OuterRef("pk")).active_path().order_by()
        count = Func(F("pk"), function="COUNT", output_field=models.IntegerField())
        return self.annotate(message_count=Subquery(shown.annotate(n=count).values("n")[:1]))


class Conversation(models.Model):
    # What its owner may change after creating it (services.update_conversation).
    SETTINGS_FIELDS = ("title", "system_prompt", "temperature", "max_new_tokens")
    # Limits the forms, the API and the importer all read. (The server may cap replies lower:
    # see max_new_tokens_ceiling.)
    MAX_SYSTEM_PROMPT_CHARS = 20_000
    TEMPERATURE_RANGE = (0.0, 2.0)
    MAX_NEW_TOKENS_RANGE = (1, 4096)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField(blank=True)
    # Per-conversation generation parameters; null means the server's default.
    temperature = models.FloatField(null=True, blank=True, validators=_between(*TEMPERATURE_RANGE))
    max_new_tokens = models.PositiveIntegerField(
        null=True, blank=True, validators=_between(*MAX_NEW_TOKENS_RANGE)
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Moves on every message, so lists can sort by last activity without a join.
    updated_at = models.DateTimeField(default=timezone.now)

    # A conversation a program sends whole every turn (OpenAI's chat completions): the key it
    # came with, and the digest of its turns as they stand, by which its next call is matched
    # (transcripts.py). Nullable without defaults, so that SQLite adds the columns in place
    # instead of rebuilding the table without its search triggers.
    api_key = models.ForeignKey(
        "accounts.ApiKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="conversations",
        help_text="The API key of the program that sent this conversation whole, if one did.",
    )
    transcript_digest = models.CharField(  # noqa: DJ001 (see above)
        max_length=64, null=True, blank=True, editable=False, db_index=True
    )
    # Up to 16 short strings a program keeps with it (OpenAI's conversation `metadata`).
    metadata = models.JSONField(null=True, blank=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="conversation_owner_recent")]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.id}"

    def save(self, *args, **kwargs):
        # Every way a title is set (API, pages, import, admin) saves through here; the services
        # that update titles in place clean them with the same function.
        self.title = clean_title(self.title)
        super().save(*args, **kwargs)

    def get_absolute_url(self) -> str:
        from django.urls import reverse

        return reverse("conversations:thread", args=[self.id])

    @property
    def display_title(self) -> str:
        return self.title or "Untitled chat"

    @classmethod
    def max_new_tokens_ceiling(cls) -> int:
        """The largest reply budget a conversation may ask for now: the field's range, capped
        by the server's CHATBOT_MAX_NEW_TOKENS_LIMIT."""
        return min(cls.MAX_NEW_TOKENS_RANGE[1], settings.CHATBOT_MAX_NEW_TOKENS_LIMIT)

    @classmethod
    def validate_max_new_tokens(cls, value: int | None) -> None:
        """A reply budget may not exceed the server's ceiling (null: the default)."""
        limit = cls.max_new_tokens_ceiling()
        if value is not None and value > limit:
            raise ValidationError(
                f"This server writes replies of at most {limit} tokens; {value} is more than that.",
                code="max_value",
            )


# What a reply counts about how it was written: tokens, milliseconds, earlier turns.
REPLY_COUNTS = ("prompt_tokens", "completion_tokens", "ttft_ms", "total_ms", "context_turns")
# What a reply records about how it was written (empty on user messages).
REPLY_FIELDS = ("model", *REPLY_COUNTS, "generation_params")
# Its owner's judgement of a reply.
FEEDBACK_FIELDS = ("rating", "feedback", "rated_at")


class MessageQuerySet(models.QuerySet):
    def active_path(self):
        """The chosen versions: active messages, leaving out replies to inactive questions."""
        return self.filter(is_active=True).exclude(
            reply_to__isnull=False, reply_to__is_active=False
        )

    def with_versions(self):
        """Annotate `version` (1-based, oldest first) and `versions` (how many siblings)."""
        siblings = Message.objects.filter(version_group=OuterRef("version_group")).order_by()
        count = Func(F("pk"), function="COUNT", output_field=models.IntegerField())
        return self.annotate(
            versions=Subquery(siblings.annotate(n=count).values("n")[:1]),
            version=Subquery(
                siblings.filter(created_at__lte=OuterRef("created_at"))
                .annotate(n=count)
                .values("n")[:1]
            ),
        )


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        OK = "ok"
        STREAMING = "streaming"  # the model is writing this reply now
        CANCELLED = "cancelled"  # stopped by the user; the partial text is kept
        INTERRUPTED = "interrupted"  # the server stopped while writing; the partial text is kept
        ERROR = "error"  # generation failed; `error` says why

    class Rating(models.IntegerChoices):
        UP = 1, "Thumbs up"
        DOWN = -1, "Thumbs down"

    # The longest comment a rating may carry (pages, API and imports alike).
    MAX_FEEDBACK_CHARS = 2000

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    error = models.TextField(blank=True)

    # Versions. A reply answers one user message (`reply_to`); regenerating adds a sibling reply
    # and editing the last user message adds a sibling user message. Siblings share a
    # `version_group`, and exactly one of them is active: only the active path goes into the
    # model's context and the thread.
    reply_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="replies"
    )
    version_group = models.UUIDField(default=uuid.uuid4, db_index=True)
    is_active = models.BooleanField(default=True)

    # What happened when the model wrote this reply (empty on user messages).
    model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField("time to first token (ms)", null=True, blank=True)
    total_ms = models.PositiveIntegerField("total time (ms)", null=True, blank=True)
    context_turns = models.PositiveIntegerField(
        null=True, blank=True, help_text="Earlier messages of the conversation the model saw."
    )
    generation_params = models.JSONField(default=dict, blank=True)
    # What the model read to write this reply (context.ContextRecord): the system prompt, the ids
    # of the earlier messages kept, how many older ones were dropped for room. Kept as it was
    # when later messages are edited or regenerated.
    context = models.JSONField(null=True, blank=True, editable=False)
    # Its owner's judgement of a reply: thumbs up (1) or down (-1), and why, if they said.
    rating = models.SmallIntegerField(null=True, blank=True, choices=Rating.choices)
    feedback = models.TextField(null=True, blank=True)  # noqa: DJ001 (nullable: see below)
    rated_at = models.DateTimeField(null=True, blank=True)
    # The lease of a reply being written: its writer renews this while it lives (leases.py). A
    # streaming reply whose lease is older than CHATBOT_STALE_REPLY_SECONDS, or that has none
    # (written before leases existed), has lost its writer. (This and the fields above are
    # nullable without a default, so that SQLite adds the columns in place instead of
    # rebuilding the table without its search triggers.)
    lease_renewed_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["conversation", "created_at"], name="message_conversation_order"),
            # Finds the replies being written (a handful) without reading the whole log.
            models.Index(
                fields=["lease_renewed_at"],
                condition=models.Q(status="streaming"),
                name="message_streaming_lease",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"

    @property
    def total_seconds(self) -> float | None:
        return None if self.total_ms is None else self.total_ms / 1000

    @property
    def tokens_per_second(self) -> float | None:
        if not self.completion_tokens or not self.total_ms:
            return None
        return self.completion_tokens / (self.total_ms / 1000)


# A rating as the API and exports spell it, and as stored.
RATING_NAMES = {"up": Message.Rating.UP, "down": Message.Rating.DOWN}


def rating_name(rating: int | None) -> str | None:
    """A stored rating as RATING_NAMES spells it ("up", "down"); None if not rated."""
    return next((name for name, stored in RATING_NAMES.items() if stored == rating), None)
