"""The table the rate limits count in (settings.RATE_LIMIT_CACHE, Django's database cache)."""

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    # Makes the table of every database cache in settings.CACHES, if it is not there yet.
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0004_reply_lease"),
    ]

    operations = [
        migrations.RunPython(create_cache_table, migrations.RunPython.noop, elidable=False),
    ]
