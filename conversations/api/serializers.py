from functools import cache

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .. import exports
from ..models import (
    FEEDBACK_FIELDS,
    RATING_NAMES,
    REPLY_FIELDS,
    Conversation,
    Message,
    rating_name,
)
from ..validators import validate_message_content


@extend_schema_field(
    {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.CHATBOT_MAX_MESSAGE_CHARS,
        # Something besides whitespace, and no NUL character.
        "pattern": "^[^\\u0000]*\\S[^\\u0000]*$",
        "description": "The message; whitespace around it is kept.",
    }
)
class MessageContentField(serializers.CharField):
    """A chat message's text: a string as sent, whitespace kept, checked by one validator."""

    default_error_messages = {"blank": "Message content must not be empty."}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(validators=[validate_message_content], **kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class SystemPromptField(serializers.CharField):
    """A conversation's system prompt, kept as sent (services.system_prompt_or_default)."""

    def __init__(self, **kwargs):
        super().__init__(
            required=False,
            allow_null=True,
            allow_blank=True,
            trim_whitespace=False,
            max_length=Conversation.MAX_SYSTEM_PROMPT_CHARS,
            help_text="Null, or left out when creating: the server's default system prompt. "
            "Empty: no system prompt.",
            **kwargs,
        )


@extend_schema_field({"type": "string", "enum": ["up", "down"], "nullable": True})
class RatingField(serializers.Field):
    """A reply's thumbs up or down: "up", "down" or null (not rated)."""

    default_error_messages = {"invalid": 'A rating is "up", "down" or null.'}

    def to_representation(self, value):
        return rating_name(value)

    def to_internal_value(self, data):
        if data not in RATING_NAMES:
            self.fail("invalid")
        return RATING_NAMES[data]


class MessageSerializer(serializers.ModelSerializer):
    rating = RatingField(read_only=True, help_text="Replies: your thumbs up or down, if any.")
    version = serializers.IntegerField(
        read_only=True, default=1, help_text="Which version this is among its siblings (1-based)."
    )
    versions = serializers.IntegerField(
        read_only=True, default=1, help_text="How many versions there are of this message."
    )

    class Meta:
        model = Message
        fields = (
            "id",
            "role",
            "content",
            "status",
            "error",
            "created_at",
            "is_active",
            "version",
            "versions",
            "version_group",
            "reply_to",
            *REPLY_FIELDS,
            *FEEDBACK_FIELDS,
        )
        read_only_fields = fields

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if instance.role != Message.Role.ASSISTANT:
            for field in (*REPLY_FIELDS, *FEEDBACK_FIELDS, "reply_to"):
                data.pop(field, None)
        if not instance.error:
            data.pop("error", None)
        return data


class FeedbackSerializer(serializers.Serializer):
    rating = RatingField(allow_null=True, help_text='"up", "down", or null to take it back.')
    feedback = serializers.CharField(
        required=False, allow_blank=True, allow_null=True, help_text="Why, in a few words."
    )


class ContextMessageSerializer(serializers.Serializer):
    id = serializers.UUIDField(allow_null=True, help_text="Null: the message was deleted since.")
    role = serializers.CharField(allow_null=True)
    content = serializers.CharField(allow_null=True)


class ReplyContextSerializer(serializers.Serializer):
    recorded = serializers.BooleanField(
        help_text="False for a reply written before replies kept their context."
    )
    system_prompt = serializers.CharField(allow_blank=True, allow_null=True)
    dropped = serializers.IntegerField(
        allow_null=True, help_text="Older messages left out: they did not fit."
    )
    messages = ContextMessageSerializer(
        many=True, help_text="The earlier messages the model read, oldest first."
    )
    question = ContextMessageSerializer(help_text="The message the reply answers.")
    prompt_tokens = serializers.IntegerField(allow_null=True)


def context_data(reply: Message, recorded) -> dict:
    """ReplyContextSerializer's document for `reply` and its RecordedContext (or None)."""

    def item(message: Message | None) -> dict:
        if message is None:
            return {"id": None, "role": None, "content": None}
        return {"id": message.pk, "role": message.role, "content": message.content}

    return ReplyContextSerializer(
        {
            "recorded": recorded is not None,
            "system_prompt": recorded.system_prompt if recorded else None,
            "dropped": recorded.dropped if recorded else None,
            "messages": [item(m) for m in recorded.messages] if recorded else [],
            "question": item(reply.reply_to),
            "prompt_tokens": reply.prompt_tokens,
        }
    ).data


def message_data(message: Message) -> dict:
    """`MessageSerializer(message).data`, from one serializer kept for the process: a model
    serializer builds its fields anew for every instance, which took 0.47 ms of each streamed
    event's 0.50 (a streamed reply has two or three such events)."""
    return _shared_message_serializer().to_representation(message)


@cache
def _shared_message_serializer() -> MessageSerializer:
    # Its fields are built at its first use and only read afterwards (no context, no state of
    # one message left for the next): threads can share it.
    return MessageSerializer()


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True)
    system_prompt = SystemPromptField()
    snippet = serializers.CharField(
        read_only=True,
        help_text="Only in search results (`?q=`): the best matching text, plain. "
        "Absent otherwise.",
    )

    class Meta:
        model = Conversation
        fields = (
            "id",
            "title",
            "system_prompt",
            "temperature",
            "max_new_tokens",
            "created_at",
            "updated_at",
            "message_count",
            "snippet",
        )
        extra_kwargs = {
            "temperature": {"help_text": "0 is greedy; null: the server's default."},
            "max_new_tokens": {"help_text": "Reply budget in tokens; null: the server's default."},
        }
        read_only_fields = ("id", "created_at", "updated_at", "message_count")

    def get_fields(self):
        fields = super().get_fields()
        # The schema states the server's ceiling as the field's maximum; validate_max_new_tokens
        # enforces it (the setting as it is now).
        fields["max_new_tokens"].max_value = Conversation.max_new_tokens_ceiling()
        return fields

    def validate_max_new_tokens(self, value):
        Conversation.validate_max_new_tokens(value)
        return value


# (Braces doubled: DRF formats these messages.)
NOT_AN_OBJECT = 'The request body must be a JSON object, such as {{"content": "Hello"}}'


class PostMessageSerializer(serializers.Serializer):
    default_error_messages = {
        "invalid": NOT_AN_OBJECT + " (got a JSON {datatype}).",
    }

    content = MessageContentField()
    stream = serializers.BooleanField(
        required=False, default=False, help_text="Answer as Server-Sent Events."
    )


class StartMessageSerializer(PostMessageSerializer):
    conversation = serializers.UUIDField(
        required=False, allow_null=True, help_text="Omit to start a new conversation."
    )


def load_versions(*messages: Message) -> None:
    """Set `version` and `versions` on messages that do not know them yet (not loaded
    with_versions(), nor saved as the first of their versions)."""
    messages = tuple(m for m in messages if m and getattr(m, "versions", None) is None)
    if not messages:
        return
    counts = Message.objects.with_versions().filter(pk__in=[m.pk for m in messages])
    found = {row["pk"]: row for row in counts.values("pk", "version", "versions")}
    for message in messages:
        if message.pk in found:
            message.version = found[message.pk]["version"]
            message.versions = found[message.pk]["versions"]


class ExchangeSerializer(serializers.Serializer):
    conversation = serializers.UUIDField(source="user_message.conversation_id", read_only=True)
    user_message = MessageSerializer(read_only=True)
    reply = MessageSerializer(read_only=True)


class StreamOptionSerializer(serializers.Serializer):
    stream = serializers.BooleanField(
        required=False, default=False, help_text="Answer as Server-Sent Events."
    )


class ActivateSerializer(serializers.Serializer):
    message = serializers.UUIDField(help_text="The version to switch to.")


class StopResultSerializer(serializers.Serializer):
    stopped = serializers.BooleanField()
    detail = serializers.CharField()


# --- the export document, for the schema (exports.py builds it, imports.py reads it) -------------


class ExportedConversationSerializer(serializers.Serializer):
    title = serializers.CharField(allow_blank=True)
    system_prompt = SystemPromptField()
    temperature = serializers.FloatField(allow_null=True, required=False)
    max_new_tokens = serializers.IntegerField(allow_null=True, required=False)
    created_at = serializers.DateTimeField(required=False)
    updated_at = serializers.DateTimeField(required=False)


class ExportedMessageSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The message's id inside this document.")
    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = serializers.CharField(allow_blank=True)
    status = serializers.ChoiceField(choices=Message.Status.choices, required=False)
    error = serializers.CharField(allow_blank=True, required=False)
    created_at = serializers.DateTimeField()
    reply_to = serializers.CharField(
        allow_null=True, required=False, help_text="The id of the message this one answers."
    )
    version_group = serializers.CharField(
        allow_null=True, required=False, help_text="Versions of one turn share a group."
    )
    is_active = serializers.BooleanField(
        required=False, help_text="The chosen version of its group."
    )
    model = serializers.CharField(allow_blank=True, required=False)
    prompt_tokens = serializers.IntegerField(allow_null=True, required=False)
    completion_tokens = serializers.IntegerField(allow_null=True, required=False)
    ttft_ms = serializers.IntegerField(allow_null=True, required=False)
    total_ms = serializers.IntegerField(allow_null=True, required=False)
    context_turns = serializers.IntegerField(allow_null=True, required=False)
    generation_params = serializers.DictField(required=False)
    rating = serializers.ChoiceField(
        choices=list(RATING_NAMES), allow_null=True, required=False, help_text="Replies only."
    )
    feedback = serializers.CharField(allow_null=True, allow_blank=True, required=False)
    rated_at = serializers.DateTimeField(allow_null=True, required=False)
    context = serializers.DictField(
        allow_null=True,
        required=False,
        help_text='What the model read: {"system_prompt", "messages" (ids in this document, '
        'oldest first), "dropped"}.',
    )


class ExportDocumentSerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=[exports.FORMAT])
    version = serializers.ChoiceField(choices=[exports.VERSION])
    exported_at = serializers.DateTimeField(required=False)
    conversation = ExportedConversationSerializer()
    messages = ExportedMessageSerializer(
        many=True, help_text="Every version of every message, oldest first."
    )


class ImportUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="A JSON export of a conversation.")
