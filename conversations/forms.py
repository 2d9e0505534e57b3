from django import forms
from django.conf import settings

from .models import Conversation
from .validators import validate_max_new_tokens, validate_message_content


class MessageForm(forms.Form):
    content = forms.CharField(
        label="Message",
        strip=False,
        validators=[validate_message_content],
        widget=forms.Textarea(
            attrs={"rows": 3, "placeholder": "Send a message…", "autofocus": True}
        ),
    )


class NewConversationForm(MessageForm):
    system_prompt = forms.CharField(
        label="System prompt",
        required=False,
        strip=False,
        max_length=20000,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="How the assistant should behave in this chat. Leave empty for the default.",
    )


class ConversationSettingsForm(forms.ModelForm):
    class Meta:
        model = Conversation
        fields = ("title", "system_prompt", "temperature", "max_new_tokens")
        widgets = {
            "system_prompt": forms.Textarea(attrs={"rows": 4}),
            "temperature": forms.NumberInput(attrs={"step": "0.1", "min": "0", "max": "2"}),
            "max_new_tokens": forms.NumberInput(attrs={"min": "1"}),
        }
        help_texts = {
            "title": "Leave empty to name the chat after its first message.",
            "temperature": "0 answers the same way every time (recommended for small models); "
            "higher values vary more. Empty: the server's default.",
            "max_new_tokens": "The longest reply, in tokens. Empty: the server's default.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["max_new_tokens"].widget.attrs["max"] = settings.CHATBOT_MAX_NEW_TOKENS_LIMIT

    def clean_max_new_tokens(self):
        value = self.cleaned_data["max_new_tokens"]
        validate_max_new_tokens(value)
        return value
