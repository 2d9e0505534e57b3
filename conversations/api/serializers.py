from django.conf import settings
from rest_framework import serializers

from ..models import Conversation, Message
from ..validators import validate_message_content

REPLY_FIELDS = (
    "model",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "total_ms",
    "context_turns",
    "generation_params",
)


class MessageContentField(serializers.CharField):
    """A chat message's text: a string as sent, whitespace kept, checked by one validator."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("allow_blank", True)  # so emptiness gets the validator's message
        super().__init__(validators=[validate_message_content], **kwargs)

    def run_validation(self, data=serializers.empty):
        value = super().run_validation(data)
        if value == "":
            # CharField returns "" early, skipping validators, when blanks are allowed.
            self.run_validators(value)
        return value

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ("id", "role", "content", "status", "error", "created_at", *REPLY_FIELDS)
        read_only_fields = fields

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if instance.role != Message.Role.ASSISTANT:
            for field in REPLY_FIELDS:
                data.pop(field, None)
        if not instance.error:
            data.pop("error", None)
        return data


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True)
    system_prompt = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        trim_whitespace=False,
        max_length=20000,
        help_text="Omit (or null) for the server's default system prompt.",
    )

    class Meta:
        model = Conversation
        fields = ("id", "title", "system_prompt", "created_at", "updated_at", "message_count")
        read_only_fields = ("id", "created_at", "updated_at", "message_count")

    def update(self, instance, validated_data):
        if "system_prompt" in validated_data and validated_data["system_prompt"] is None:
            validated_data["system_prompt"] = settings.CHATBOT_SYSTEM_PROMPT
        return super().update(instance, validated_data)


class PostMessageSerializer(serializers.Serializer):
    content = MessageContentField()


class StartMessageSerializer(PostMessageSerializer):
    conversation = serializers.UUIDField(
        required=False, allow_null=True, help_text="Omit to start a new conversation."
    )


class ExchangeSerializer(serializers.Serializer):
    conversation = serializers.UUIDField(source="user_message.conversation_id", read_only=True)
    user_message = MessageSerializer(read_only=True)
    reply = MessageSerializer(read_only=True)
