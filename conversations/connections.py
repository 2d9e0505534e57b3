"""Database connections of threads that stream replies.

A thread that streams a reply for minutes uses the database only now and then: its first text,
the process's save of all its replies every half second (leases.py), its last save. It gives
its connection back in between: to the pool on PostgreSQL (DATABASE_POOL_SIZE, settings.py), so
that hundreds of streams take a handful of the database server's connections, not one each; on
SQLite a connection is a file handle, closed and opened again for next to nothing.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection


def release() -> None:
    """Give back this thread's connection, unless a transaction is open on it."""
    if not connection.in_atomic_block:
        connection.close()


@contextmanager
def briefly() -> Iterator[None]:
    """Use the database for a moment, then release() the connection."""
    try:
        yield
    finally:
        release()
