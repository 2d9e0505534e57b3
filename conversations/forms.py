from django import forms

from .validators import validate_message_content


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
