"""OpenAI's objects as this API writes them, for the OpenAPI schema (and Schemathesis, which
checks the answers against it). Their components are named OpenAI*: api/schema.py leaves them
as they are."""

from rest_framework import serializers


class OpenAIErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField(allow_null=True)


class OpenAIErrorSerializer(serializers.Serializer):
    error = OpenAIErrorDetailSerializer()


class OpenAIModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["model"])
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class OpenAIModelListSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=["list"])
    data = OpenAIModelSerializer(many=True)


class OpenAIChatCompletionMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_blank=True)
    refusal = serializers.CharField(allow_null=True)


class OpenAIChatCompletionChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = OpenAIChatCompletionMessageSerializer()
    logprobs = serializers.JSONField(allow_null=True)
    finish_reason = serializers.ChoiceField(choices=["stop", "length"])


class OpenAIUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class OpenAIChatCompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion"])
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = OpenAIChatCompletionChoiceSerializer(many=True)
    usage = OpenAIUsageSerializer()
    system_fingerprint = serializers.CharField(allow_null=True)
    conversation = serializers.UUIDField(
        help_text="Not OpenAI's: the stored conversation (the product's API and pages)."
    )


class OpenAIMetadataField(serializers.DictField):
    def __init__(self, **kwargs):
        super().__init__(
            child=serializers.CharField(max_length=512, allow_blank=True),
            required=False,
            help_text="Up to 16 keys (at most 64 characters) and string values (at most 512).",
            **kwargs,
        )


class OpenAIItemSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["message"], required=False)
    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant"])
    content = serializers.JSONField(help_text="Text, or a list of text parts.")


class OpenAIConversationCreateRequestSerializer(serializers.Serializer):
    items = OpenAIItemSerializer(many=True, required=False, max_length=20)
    metadata = OpenAIMetadataField()


class OpenAIConversationUpdateRequestSerializer(serializers.Serializer):
    metadata = OpenAIMetadataField()


class OpenAIConversationItemsRequestSerializer(serializers.Serializer):
    items = OpenAIItemSerializer(many=True, max_length=20)


class OpenAIConversationSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["conversation"])
    created_at = serializers.IntegerField()
    metadata = serializers.DictField(child=serializers.CharField())


class OpenAIDeletedSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    deleted = serializers.BooleanField()
