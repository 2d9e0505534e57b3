from django import forms
from django.conf import settings
from django.utils.html import format_html

from accounts.models import ApiKey

from ..models import Conversation
from ..validators import validate_message_content

SYSTEM_PROMPT_HELP = "How the assistant should behave in this chat. Empty: no system prompt."


class SystemPromptField(forms.CharField):
    """A conversation's system prompt, kept as typed. Empty means no system prompt (see
    services.system_prompt_or_default)."""

    def __init__(self, *, rows: int, **kwargs):
        super().__init__(
            label="System prompt",
            required=False,
            strip=False,
            max_length=Conversation.MAX_SYSTEM_PROMPT_CHARS,
            widget=forms.Textarea(attrs={"rows": rows}),
            help_text=SYSTEM_PROMPT_HELP,
            **kwargs,
        )


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
    system_prompt = SystemPromptField(rows=2)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Offered filled in: sent as it is, the chat gets the server's default.
        self.fields["system_prompt"].initial = settings.CHATBOT_SYSTEM_PROMPT

    def clean_system_prompt(self):
        # A post without the field (not a browser's) asks for the default, as the API's does.
        if self.add_prefix("system_prompt") not in self.data:
            return None
        return self.cleaned_data["system_prompt"]


class ConversationSettingsForm(forms.ModelForm):
    system_prompt = SystemPromptField(rows=4)

    class Meta:
        model = Conversation
        fields = Conversation.SETTINGS_FIELDS
        widgets = {"temperature": forms.NumberInput(attrs={"step": "0.1"})}
        help_texts = {
            "title": "Leave empty to name the chat after its first message.",
            "temperature": "0 answers the same way every time (recommended for small models); "
            "higher values vary more. Empty: the server's default.",
            "max_new_tokens": "The longest reply, in tokens. Empty: the server's default.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        low, high = Conversation.TEMPERATURE_RANGE
        self.fields["temperature"].widget.attrs.update(min=f"{low:g}", max=f"{high:g}")
        self.fields["max_new_tokens"].widget.attrs.update(
            min=Conversation.MAX_NEW_TOKENS_RANGE[0], max=Conversation.max_new_tokens_ceiling()
        )
        # The page has no "default" button: it says what the default is, to copy back in.
        self.fields["system_prompt"].help_text = format_html(
            "{} The server's default: “{}”", SYSTEM_PROMPT_HELP, settings.CHATBOT_SYSTEM_PROMPT
        )

    def clean_max_new_tokens(self):
        value = self.cleaned_data["max_new_tokens"]
        Conversation.validate_max_new_tokens(value)
        return value


class NewKeyForm(forms.Form):
    name = forms.CharField(
        label="Name",
        max_length=ApiKey.NAME_MAX_LENGTH,
        help_text="What will use it (a laptop, a script, an app), to tell your keys apart.",
        widget=forms.TextInput(attrs={"placeholder": "e.g. Open WebUI on my laptop"}),
    )
