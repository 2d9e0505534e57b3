"""GET /api/usage/: the caller's tokens today against their daily quota, and their last days."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import services


class UsageDaySerializer(serializers.Serializer):
    day = serializers.DateField()
    tokens = serializers.IntegerField()
    replies = serializers.IntegerField()


class UsageSerializer(serializers.Serializer):
    tokens_today = serializers.IntegerField(help_text="Prompt and reply tokens of today's replies.")
    tokens_per_day = serializers.IntegerField(allow_null=True, help_text="Null: unlimited.")
    tokens_left = serializers.IntegerField(allow_null=True, help_text="Null: unlimited.")
    resets_at = serializers.DateTimeField(help_text="When today's count starts again from 0.")
    days = UsageDaySerializer(many=True, help_text="The last days, newest first.")


class UsageView(APIView):
    @extend_schema(responses=UsageSerializer)
    def get(self, request):
        """Your tokens today against your daily quota (over it, new replies get 429 until it
        resets), and your last days."""
        today, days = services.token_usage(owner=request.user)
        return Response(
            UsageSerializer(
                {
                    "tokens_today": today.used,
                    "tokens_per_day": today.limit,
                    "tokens_left": today.remaining,
                    "resets_at": today.resets_at,
                    "days": [
                        {"day": day, "tokens": tokens, "replies": replies}
                        for day, tokens, replies in days
                    ],
                }
            ).data
        )
