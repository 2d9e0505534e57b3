"""Full-text search of a user's conversations: titles and message text.

The index lives in the database and is kept in step with every write by the database itself
(migration 0003_search_index):

* SQLite: an FTS5 table (`conversations_search`, tokenizer `porter unicode61 remove_diacritics 2`)
  with one row per conversation title and one per message, maintained by triggers. Searching is
  FTS5 MATCH; the rank is bm25 (title hits weigh double).
* PostgreSQL: GIN expression indexes on to_tsvector('english', …) of message content and of the
  title (see pg_vector). Searching is `… @@ to_tsquery('english', …)`; the rank is ts_rank (title
  hits weigh double). No accent folding, and English stop words are ignored.

User input never reaches either query language as syntax: it is cut into words (letters and
digits) and each word becomes a quoted term (FTS5) or a quoted lexeme (tsquery); the last one
matches as a prefix so results follow typing. Input without words searches for nothing.

A conversation matches when every word appears in it: in its title or in any of its messages (one
index lookup per word, all in one SQL query). Its rank is the sum over all its matching rows, so a
conversation that matches more, and better, ranks first; ties go to the most recently active.
Messages of every version are searched (their text is part of the conversation).

`search_conversations` returns a lazy, sliceable sequence (usable with Django's Paginator and
DRF's pagination). Its length costs one query (the ranked ids); each slice costs two more (the
conversations with their message counts, and the snippets of that slice), whatever its size.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from functools import cached_property

from django.db import NotSupportedError, connection

from .models import Conversation

MAX_QUERY_CHARS = 200
MAX_TERMS = 12
TITLE_WEIGHT = 2.0
SNIPPET_TOKENS = 16  # SQLite: snippet() length in tokens
SNIPPET_WORDS = 20  # PostgreSQL: ts_headline MaxWords

# Marks around matched words in raw snippets, from the Private Use Area so that they cannot
# collide with the HTML the page renders; they never leave this module.
MATCH_START = "\ue000"
MATCH_END = "\ue001"
ELLIPSIS = "…"

_WORD = re.compile(r"[^\W_]+")
_MARKS = re.compile(f"({MATCH_START}|{MATCH_END})")

# PostgreSQL: the text-search config and the indexed expression, exactly as in the expression
# indexes of migration 0003 (the indexes apply only to identical expressions). "<" is swapped for a
# private-use character first: PostgreSQL's parser reads "<…>" as an XML tag and skips it, and
# everything inside <script>, which would hide pasted HTML and code from search and snippets.
PG_CONFIG = "english"
PG_LT = "\ue002"


def pg_text(column: str) -> str:
    return f"translate({column}, '<', E'\\uE002')"


def pg_vector(column: str) -> str:
    return f"to_tsvector('{PG_CONFIG}'::regconfig, {pg_text(column)})"


def query_terms(query: str) -> list[str]:
    """The words of a user's query: letters and digits only, so no query syntax gets through."""
    text = unicodedata.normalize("NFKC", query or "")[:MAX_QUERY_CHARS]
    words = _WORD.findall(text)
    # Each word once, at its last place: the last word typed stays last (it is the prefix).
    seen: set[str] = set()
    unique = []
    for word in reversed(words):
        if word.casefold() not in seen:
            seen.add(word.casefold())
            unique.append(word)
    return unique[::-1][:MAX_TERMS]


def fts5_terms(terms: list[str]) -> list[str]:
    """FTS5 strings, one per word: `"word"`, and `"word"*` (a prefix) for the last one."""
    quoted = ['"' + term.replace('"', '""') + '"' for term in terms]
    if quoted:
        quoted[-1] += "*"
    return quoted


def tsquery_terms(terms: list[str]) -> list[str]:
    """to_tsquery strings, one per word: `'word'`, and `'word':*` (a prefix) for the last one."""
    quoted = ["'" + term.replace("\\", "\\\\").replace("'", "''") + "'" for term in terms]
    if quoted:
        quoted[-1] += ":*"
    return quoted


class Snippet:
    """The best matching text of a conversation, with the matched words marked.

    `str(snippet)` is the plain text (for the API). Iterating gives `(text, is_match)` parts, for a
    template to render with autoescaping: `<mark>` goes around the parts where is_match is true.
    """

    __slots__ = ("parts",)

    def __init__(self, raw: str | None) -> None:
        parts: list[tuple[str, bool]] = []
        matching = False
        for piece in _MARKS.split(raw or ""):
            if piece == MATCH_START:
                matching = True
            elif piece == MATCH_END:
                matching = False
            elif piece:
                if parts and parts[-1][1] == matching:
                    parts[-1] = (parts[-1][0] + piece, matching)
                else:
                    parts.append((piece, matching))
        self.parts = parts

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        return iter(self.parts)

    def __bool__(self) -> bool:
        return any(text.strip() for text, _ in self.parts)

    def __str__(self) -> str:
        return "".join(text for text, _ in self.parts)

    def __repr__(self) -> str:
        return f"Snippet({str(self)!r})"


class SearchResults(Sequence):
    """The owner's conversations that match, best first; slices are lists of Conversations,
    each with `snippet` (a Snippet) and `search_rank` (higher is better)."""

    def __init__(self, *, owner, terms: list[str]) -> None:
        self.owner = owner
        self.terms = terms
        self.backend = _backend()

    @cached_property
    def ranked(self) -> list[tuple[uuid.UUID, float]]:
        if not self.terms:
            return []
        return self.backend.ranked(owner_id=self.owner.pk, terms=self.terms)

    def __len__(self) -> int:
        return len(self.ranked)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._load(self.ranked[index])
        return self._load([self.ranked[index]])[0]

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self[:])

    def _load(self, ranked: list[tuple[uuid.UUID, float]]) -> list[Conversation]:
        if not ranked:
            return []
        ids = [conversation_id for conversation_id, _ in ranked]
        # As the list shows them, in the order of their rank.
        listed = Conversation.objects.listed_for(self.owner).filter(pk__in=ids).order_by()
        conversations = {conversation.pk: conversation for conversation in listed}
        snippets = self.backend.snippets(conversation_ids=ids, terms=self.terms)
        results = []
        for conversation_id, rank in ranked:
            conversation = conversations.get(conversation_id)
            if conversation is None:  # deleted since the ranking query
                continue
            conversation.search_rank = rank
            conversation.snippet = Snippet(snippets.get(conversation_id))
            results.append(conversation)
        return results


def search_conversations(*, owner, query: str) -> SearchResults:
    """The owner's conversations whose title or messages match `query`, best first.

    Any string is safe to pass; one without words (empty, punctuation, emoji) matches nothing.
    """
    return SearchResults(owner=owner, terms=query_terms(query))


# --- backends ------------------------------------------------------------------------------------


def _backend():
    if connection.vendor == "sqlite":
        return SQLiteSearch
    if connection.vendor == "postgresql":
        return PostgreSQLSearch
    raise NotSupportedError(f"Conversation search does not support {connection.vendor}.")


def _as_uuid(value) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


class SQLiteSearch:
    # One MATCH per word, so that a conversation matches when each word is somewhere in it (its
    # title or any message), not necessarily all in one message. bm25() is more negative for
    # better matches and cannot be used inside an aggregate, hence the MATERIALIZED CTE
    # (SQLite >= 3.35) and the sign flip. An FTS5 table cannot be aliased in a MATCH (its hidden
    # column has the table's name), so it is spelled out.
    TERM_HITS_SQL = f"""
        SELECT %s AS term, conversations_search.conversation_id AS conversation_id,
               c.updated_at AS updated_at,
               bm25(conversations_search, {TITLE_WEIGHT}, 1.0) AS score
        FROM conversations_search
        JOIN conversations_conversation c ON c.id = conversations_search.conversation_id
        WHERE conversations_search MATCH %s AND c.owner_id = %s
    """
    RANKED_SQL = """
        WITH hits AS MATERIALIZED ({term_hits})
        SELECT conversation_id, -SUM(score) AS rank
        FROM hits
        GROUP BY conversation_id
        HAVING COUNT(DISTINCT term) = %s
        ORDER BY rank DESC, MAX(updated_at) DESC, conversation_id
    """

    # Any word: the best row of each conversation (the bare rowid comes from the row of
    # MIN(score)), and snippet() of just those rows.
    SNIPPETS_SQL = f"""
        WITH hits AS MATERIALIZED (
            SELECT rowid AS id, conversation_id,
                   bm25(conversations_search, {TITLE_WEIGHT}, 1.0) AS score
            FROM conversations_search
            WHERE conversations_search MATCH %s AND conversation_id IN ({{placeholders}})
        ),
        best AS (SELECT id, MIN(score) FROM hits GROUP BY conversation_id)
        SELECT conversation_id,
               snippet(conversations_search, -1, %s, %s, %s, {SNIPPET_TOKENS})
        FROM conversations_search
        WHERE conversations_search MATCH %s AND rowid IN (SELECT id FROM best)
    """

    @classmethod
    def ranked(cls, *, owner_id, terms):
        fts_terms = fts5_terms(terms)
        sql = cls.RANKED_SQL.format(
            term_hits=" UNION ALL ".join([cls.TERM_HITS_SQL] * len(fts_terms))
        )
        params = []
        for index, term in enumerate(fts_terms):
            params += [index, term, owner_id]
        params.append(len(fts_terms))
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return [(_as_uuid(cid), float(rank)) for cid, rank in cursor.fetchall()]

    @classmethod
    def snippets(cls, *, conversation_ids, terms):
        match = " OR ".join(fts5_terms(terms))
        sql = cls.SNIPPETS_SQL.format(placeholders=", ".join(["%s"] * len(conversation_ids)))
        params = [
            match,
            *(cid.hex for cid in conversation_ids),
            MATCH_START,
            MATCH_END,
            ELLIPSIS,
            match,
        ]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return {_as_uuid(cid): text for cid, text in cursor.fetchall()}


class PostgreSQLSearch:
    # The tsvector expressions repeat the index expressions exactly, so the GIN indexes apply.
    # Rows of messages and titles that match one tsquery, {q}, with their rank.
    HITS_SQL = f"""
        SELECT m.conversation_id AS conversation_id, m.content AS body,
               c.updated_at AS updated_at,
               ts_rank({pg_vector("m.content")},
                       to_tsquery('{PG_CONFIG}'::regconfig, {{q}})) AS score
        FROM conversations_message m
        JOIN conversations_conversation c ON c.id = m.conversation_id
        WHERE {{message_filter}}
          AND {pg_vector("m.content")} @@ to_tsquery('{PG_CONFIG}'::regconfig, {{q}})
        UNION ALL
        SELECT c.id, c.title, c.updated_at,
               {TITLE_WEIGHT} * ts_rank({pg_vector("c.title")},
                                        to_tsquery('{PG_CONFIG}'::regconfig, {{q}}))
        FROM conversations_conversation c
        WHERE {{conversation_filter}}
          AND {pg_vector("c.title")} @@ to_tsquery('{PG_CONFIG}'::regconfig, {{q}})
    """

    # One tsquery per word, so that a conversation matches when each word is somewhere in it.
    # Words that are only stop words (empty tsqueries) match nothing and are not required.
    RANKED_SQL = f"""
        SELECT conversation_id, SUM(score) AS rank
        FROM ({{term_hits}}) hits
        GROUP BY conversation_id
        HAVING COUNT(DISTINCT term) = (
            SELECT count(*) FROM unnest(%(terms)s::text[]) AS t(q)
            WHERE numnode(to_tsquery('{PG_CONFIG}'::regconfig, t.q)) > 0
        )
        ORDER BY rank DESC, MAX(updated_at) DESC, conversation_id
    """
    TERM_HITS_SQL = "SELECT {index} AS term, * FROM ({hits}) term_{index}"

    # Any word: the best row of each conversation, and ts_headline of just those rows.
    SNIPPETS_SQL = f"""
        SELECT best.conversation_id,
               ts_headline('{PG_CONFIG}'::regconfig, {pg_text("best.body")},
                           to_tsquery('{PG_CONFIG}'::regconfig, %(q)s), %(options)s)
        FROM (
            SELECT DISTINCT ON (hits.conversation_id) hits.conversation_id, hits.body
            FROM ({{hits}}) hits
            ORDER BY hits.conversation_id, hits.score DESC
        ) best
    """

    HEADLINE_OPTIONS = (
        f'StartSel="{MATCH_START}", StopSel="{MATCH_END}", '
        f"MaxWords={SNIPPET_WORDS}, MinWords=8, ShortWord=2, MaxFragments=1, "
        f'FragmentDelimiter="{ELLIPSIS}"'
    )

    @classmethod
    def ranked(cls, *, owner_id, terms):
        ts_terms = tsquery_terms(terms)
        term_hits = " UNION ALL ".join(
            cls.TERM_HITS_SQL.format(
                index=index,
                hits=cls.HITS_SQL.format(
                    q=f"%(t{index})s",
                    message_filter="c.owner_id = %(owner)s",
                    conversation_filter="c.owner_id = %(owner)s",
                ),
            )
            for index in range(len(ts_terms))
        )
        params = {f"t{index}": term for index, term in enumerate(ts_terms)}
        params.update(owner=owner_id, terms=ts_terms)
        with connection.cursor() as cursor:
            cursor.execute(cls.RANKED_SQL.format(term_hits=term_hits), params)
            return [(_as_uuid(cid), float(rank)) for cid, rank in cursor.fetchall()]

    @classmethod
    def snippets(cls, *, conversation_ids, terms):
        hits = cls.HITS_SQL.format(
            q="%(q)s",
            message_filter="m.conversation_id = ANY(%(ids)s)",
            conversation_filter="c.id = ANY(%(ids)s)",
        )
        params = {
            "q": " | ".join(tsquery_terms(terms)),
            "ids": list(conversation_ids),
            "options": cls.HEADLINE_OPTIONS,
        }
        with connection.cursor() as cursor:
            cursor.execute(cls.SNIPPETS_SQL.format(hits=hits), params)
            return {_as_uuid(cid): text.replace(PG_LT, "<") for cid, text in cursor.fetchall()}
