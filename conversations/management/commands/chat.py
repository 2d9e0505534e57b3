from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from conversations import services
from conversations.errors import ChatError
from conversations.models import Conversation
from conversations.replies import EventKind
from conversations.validators import terminal_text, validate_message_content

EXIT_WORDS = {"/quit", "/exit"}


class Command(BaseCommand):
    help = "Chat with the model in the terminal; turns are stored like any other conversation."

    def add_arguments(self, parser):
        parser.add_argument("--conversation", help="Id of a conversation to continue.")
        parser.add_argument(
            "--user",
            help="Username that owns the chat (created without a password if missing). "
            "Defaults to the conversation's owner, or 'terminal'.",
        )

    def handle(self, *args, conversation=None, user=None, **options):
        owner = self._owner(user) if user else None
        if conversation:
            try:
                chat = Conversation.objects.select_related("owner").get(pk=conversation)
            except (Conversation.DoesNotExist, ValidationError) as exc:
                raise CommandError(f"No conversation with id {conversation!r}.") from exc
            if owner and chat.owner != owner:
                raise CommandError(f"Conversation {conversation} does not belong to {user!r}.")
            self._print_history(chat)
        else:
            chat = services.create_conversation(owner=owner or self._owner("terminal"))
        self.stdout.write(
            f"Conversation {chat.pk}. Type a message; /quit or Ctrl-D to leave "
            f"(continue later with --conversation {chat.pk})."
        )
        while True:
            try:
                content = input("you> ")
            except (EOFError, KeyboardInterrupt):
                self.stdout.write("")
                break
            if content.strip() in EXIT_WORDS:
                break
            try:
                validate_message_content(content)
            except ValidationError as exc:
                self.stderr.write(" ".join(exc.messages))
                continue
            try:
                self._answer(services.open_message_stream(conversation=chat, content=content))
            except ChatError as exc:
                self.stderr.write(f"error: {exc.detail}")
            except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply, not the chat
                services.stop_generation(conversation=chat)
                self.stdout.write(" [stopped]")

    def _answer(self, writer):
        """Print the reply as the model writes it."""
        self.stdout.write("bot> ", ending="")
        try:
            for event in writer:
                if event.kind == EventKind.DELTA:
                    self.stdout.write(terminal_text(event.data), ending="")
                    self.stdout.flush()
                elif event.kind == EventKind.DONE:
                    self.stdout.write("")
                elif event.kind == EventKind.ERROR:
                    self.stdout.write("")
                    self.stderr.write(f"error: {event.detail}")
                elif event.kind == EventKind.TITLE:
                    self.stdout.write(f"(this chat is now titled {terminal_text(event.data)!r})")
        finally:
            writer.cancel_and_finish()

    def _owner(self, username):
        owner, created = get_user_model().objects.get_or_create(username=username)
        if created:
            owner.set_unusable_password()
            owner.save()
        return owner

    def _print_history(self, chat):
        for message in chat.messages.order_by("created_at"):
            speaker = "you" if message.role == "user" else "bot"
            text = message.content or f"[{message.error}]"
            self.stdout.write(f"{speaker}> {terminal_text(text)}")
