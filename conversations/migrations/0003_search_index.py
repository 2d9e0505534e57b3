"""Full-text search index over conversation titles and message text (see conversations/search.py).

SQLite: an FTS5 table, `conversations_search`, with one row per conversation (its title, in the
`title` column) and one per message (its text, in `content`); `conversation_id` is stored
UNINDEXED so hits can be grouped and checked against the owner. FTS5 rows are addressed by an
integer rowid, while our primary keys are UUIDs, so `conversations_searchdoc` maps each
message/conversation id (`source_id`) to its FTS rowid with a unique index; that keeps every
trigger an indexed lookup instead of a scan of the FTS table. Triggers on INSERT, UPDATE and
DELETE of conversations_message and conversations_conversation keep the index in step with every
write, including bulk_create, queryset.update() and the cascading delete of a conversation's
messages (Django deletes those with SQL, which fires the triggers). Tokenizer: `porter unicode61
remove_diacritics 2` (English stemming, case- and accent-insensitive).

Careful: on SQLite, a later migration that rebuilds conversations_message or
conversations_conversation (Django's "create new table, copy, drop old" for an AlterField and
similar) drops these triggers with the old table. Such a migration must run
`create_sqlite_triggers` again; tests/test_search.py checks that the triggers exist after all
migrations.

PostgreSQL: GIN expression indexes on to_tsvector('english', content) and
to_tsvector('english', title), with "<" first swapped for U+E002 so that PostgreSQL's parser does
not skip tag-like text ("<div>", and all of "<script>…</script>") in pasted HTML or code. The
text-search config is 'english' (stemming, like SQLite's porter tokenizer; English stop words are
ignored). search.py (pg_vector) must use exactly the same expressions for the indexes to apply.

Other databases: nothing is created (search is not supported there).
"""

from django.db import migrations

# --- SQLite --------------------------------------------------------------------------------------

SQLITE_TABLES = [
    """
    CREATE TABLE conversations_searchdoc (
        id INTEGER PRIMARY KEY,
        source_id char(32) NOT NULL UNIQUE
    )
    """,
    """
    CREATE VIRTUAL TABLE conversations_search USING fts5(
        title,
        content,
        conversation_id UNINDEXED,
        tokenize = 'porter unicode61 remove_diacritics 2'
    )
    """,
]

SQLITE_FILL = [
    "INSERT INTO conversations_searchdoc (source_id) SELECT id FROM conversations_conversation",
    "INSERT INTO conversations_searchdoc (source_id) SELECT id FROM conversations_message",
    """
    INSERT INTO conversations_search (rowid, title, content, conversation_id)
    SELECT d.id, c.title, '', c.id
    FROM conversations_conversation c JOIN conversations_searchdoc d ON d.source_id = c.id
    """,
    """
    INSERT INTO conversations_search (rowid, title, content, conversation_id)
    SELECT d.id, '', m.content, m.conversation_id
    FROM conversations_message m JOIN conversations_searchdoc d ON d.source_id = m.id
    """,
]

SQLITE_TRIGGERS = {
    "conversations_search_message_insert": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_message_insert
    AFTER INSERT ON conversations_message
    BEGIN
        INSERT INTO conversations_searchdoc (source_id) VALUES (new.id);
        INSERT INTO conversations_search (rowid, title, content, conversation_id)
        VALUES (
            (SELECT id FROM conversations_searchdoc WHERE source_id = new.id),
            '', new.content, new.conversation_id
        );
    END
    """,
    "conversations_search_message_update": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_message_update
    AFTER UPDATE OF id, content, conversation_id ON conversations_message
    WHEN old.content IS NOT new.content
        OR old.conversation_id IS NOT new.conversation_id
        OR old.id IS NOT new.id
    BEGIN
        UPDATE conversations_searchdoc SET source_id = new.id WHERE source_id = old.id;
        UPDATE conversations_search
        SET content = new.content, conversation_id = new.conversation_id
        WHERE rowid = (SELECT id FROM conversations_searchdoc WHERE source_id = new.id);
    END
    """,
    "conversations_search_message_delete": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_message_delete
    AFTER DELETE ON conversations_message
    BEGIN
        DELETE FROM conversations_search
        WHERE rowid = (SELECT id FROM conversations_searchdoc WHERE source_id = old.id);
        DELETE FROM conversations_searchdoc WHERE source_id = old.id;
    END
    """,
    "conversations_search_conversation_insert": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_conversation_insert
    AFTER INSERT ON conversations_conversation
    BEGIN
        INSERT INTO conversations_searchdoc (source_id) VALUES (new.id);
        INSERT INTO conversations_search (rowid, title, content, conversation_id)
        VALUES (
            (SELECT id FROM conversations_searchdoc WHERE source_id = new.id),
            new.title, '', new.id
        );
    END
    """,
    "conversations_search_conversation_update": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_conversation_update
    AFTER UPDATE OF id, title ON conversations_conversation
    WHEN old.title IS NOT new.title OR old.id IS NOT new.id
    BEGIN
        UPDATE conversations_searchdoc SET source_id = new.id WHERE source_id = old.id;
        UPDATE conversations_search
        SET title = new.title, conversation_id = new.id
        WHERE rowid = (SELECT id FROM conversations_searchdoc WHERE source_id = new.id);
    END
    """,
    "conversations_search_conversation_delete": """
    CREATE TRIGGER IF NOT EXISTS conversations_search_conversation_delete
    AFTER DELETE ON conversations_conversation
    BEGIN
        DELETE FROM conversations_search
        WHERE rowid = (SELECT id FROM conversations_searchdoc WHERE source_id = old.id);
        DELETE FROM conversations_searchdoc WHERE source_id = old.id;
    END
    """,
}

# --- PostgreSQL ----------------------------------------------------------------------------------

# The expressions must stay identical to conversations.search.pg_vector().
POSTGRESQL_INDEXES = [
    r"""
    CREATE INDEX conversations_message_search ON conversations_message
    USING gin (to_tsvector('english'::regconfig, translate(content, '<', E'\uE002')))
    """,
    r"""
    CREATE INDEX conversations_conversation_search ON conversations_conversation
    USING gin (to_tsvector('english'::regconfig, translate(title, '<', E'\uE002')))
    """,
]

POSTGRESQL_DROP = [
    "DROP INDEX IF EXISTS conversations_message_search",
    "DROP INDEX IF EXISTS conversations_conversation_search",
]


def create_sqlite_triggers(schema_editor):
    """(Re)create the triggers that keep the FTS table in step; safe to run again."""
    for sql in SQLITE_TRIGGERS.values():
        schema_editor.execute(sql, params=None)


def create_index(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for sql in SQLITE_TABLES + SQLITE_FILL:
            schema_editor.execute(sql, params=None)
        create_sqlite_triggers(schema_editor)
    elif vendor == "postgresql":
        for sql in POSTGRESQL_INDEXES:
            schema_editor.execute(sql, params=None)


def drop_index(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for name in SQLITE_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name}", params=None)
        schema_editor.execute("DROP TABLE IF EXISTS conversations_search", params=None)
        schema_editor.execute("DROP TABLE IF EXISTS conversations_searchdoc", params=None)
    elif vendor == "postgresql":
        for sql in POSTGRESQL_DROP:
            schema_editor.execute(sql, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0002_versions_and_parameters"),
    ]

    operations = [
        migrations.RunPython(create_index, drop_index, elidable=False),
    ]
