"""API tokens from before API keys (DRF's authtoken table, which kept each key in plain text)
become API keys with the same key: only its digest is kept, and the plain-text rows go."""

import hashlib
from datetime import UTC, datetime

from django.db import migrations
from django.utils import timezone

OLD_TABLE = "authtoken_token"


def _aware(created):
    # SQLite gives the text Django stored, in UTC without an offset.
    if isinstance(created, str):
        created = datetime.fromisoformat(created)
    return created if timezone.is_aware(created) else created.replace(tzinfo=UTC)


def hash_existing_tokens(apps, schema_editor):
    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return  # a database made after API keys came
    ApiKey = apps.get_model("accounts", "ApiKey")
    table, key = schema_editor.quote_name(OLD_TABLE), schema_editor.quote_name("key")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {key}, user_id, created FROM {table}")
        for plain, user_id, created in cursor.fetchall():
            digest = hashlib.sha256(plain.encode()).hexdigest()
            ApiKey.objects.create(
                user_id=user_id, name="API token", digest=digest, prefix=plain[:8]
            )
            # (`created` is set on creation: the token's own date is written after.)
            ApiKey.objects.filter(digest=digest).update(created=_aware(created))
        cursor.execute(f"DELETE FROM {table}")


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [migrations.RunPython(hash_existing_tokens, migrations.RunPython.noop)]
