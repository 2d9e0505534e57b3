"""What deleting does beyond the database: the engine's keys and values of the deleted text go
too. Receivers rather than a service, so that every way of deleting (pages, API, admin, a user's
deletion cascading to their conversations) does it."""

from django.db.models import QuerySet
from django.db.models.signals import post_delete
from django.dispatch import receiver

from .models import Conversation, Message
from .runtime import forget_cached_turns


@receiver(post_delete, sender=Conversation)
def forget_deleted_conversation(sender, instance: Conversation, **kwargs) -> None:
    forget_cached_turns(instance.pk)


@receiver(post_delete, sender=Message)
def forget_deleted_message(sender, instance: Message, origin=None, **kwargs) -> None:
    # Messages deleted with their conversation (or its owner) are forgotten with it, once,
    # rather than once per message.
    if isinstance(origin, Message) or (isinstance(origin, QuerySet) and origin.model is Message):
        forget_cached_turns(instance.conversation_id)
