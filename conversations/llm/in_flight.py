"""Counting the replies an engine is streaming, for ChatEngine.queue_depth (read by the
metrics at scrape time)."""

from __future__ import annotations

import threading


class InFlight:
    """A count of replies being streamed, for `queue_depth` (thread-safe): `with in_flight:`
    around a stream's reading."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count
