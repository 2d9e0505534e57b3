"""Noticing that a client went away while its request waits for a whole reply.

A reply answered in one piece (JSON, or a page without JavaScript) writes nothing until it ends,
and a streamed one may be written whole before a write fails (a client that closed its socket
at once still accepts the first), so the connection is watched: gunicorn hands each request its
socket (`gunicorn.socket`), and one thread polls the sockets of the requests waiting for a reply
for the client having closed its side; the reply is then stopped, and its partial text kept as
cancelled. (A client that shuts down its sending
side and still waits for the answer is taken as gone: HTTP clients do not do that.)
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

from .replies import Exchange, ReplyWriter

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25
# The peer closed the connection, or its sending side (Linux), or the connection broke.
GONE = (
    getattr(select, "POLLRDHUP", 0) | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)
)


class ClientWatcher:
    """The sockets of requests waiting for a reply, each with what to do if its client goes."""

    def __init__(self) -> None:
        self._watched: dict[int, tuple[object, Callable[[], None]]] = {}  # by file descriptor
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, sock, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call `on_gone` (once, on the watcher's thread) if the peer of `sock` closes; returns
        the function that ends the watch. A peer gone already is told at once, here: a client
        that closed right after sending its request must not wait for the next poll."""
        fd = sock.fileno()
        poller = select.poll()
        poller.register(fd, GONE)
        if poller.poll(0):
            on_gone()
            return lambda: None
        entry = (sock, on_gone)
        with self._lock:
            self._watched[fd] = entry
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="client-watch", daemon=True)
                self._thread.start()

        def unwatch() -> None:
            with self._lock:
                if self._watched.get(fd) is entry:
                    del self._watched[fd]

        return unwatch

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = dict(self._watched)
            if not watched:
                threading.Event().wait(POLL_SECONDS)
                continue
            poller = select.poll()
            for fd in watched:
                poller.register(fd, GONE)
            try:
                ready = poller.poll(POLL_SECONDS * 1000)
            except OSError:  # a socket closed meanwhile: poll again with those left
                continue
            for fd, _ in ready:
                with self._lock:
                    # (Only the request polled: its descriptor may since serve another one.)
                    if self._watched.get(fd) is not watched[fd]:
                        continue
                    del self._watched[fd]
                try:
                    watched[fd][1]()
                except Exception:
                    logger.exception("Stopping a reply whose client went away failed")


watcher = ClientWatcher()


def watch_client(request, on_gone: Callable[[], None]) -> Callable[[], None]:
    """Call `on_gone` if the client of `request` goes away; returns the function that ends the
    watch. Without a socket to watch (the test client, other servers) nothing is watched."""
    sock = request.META.get("gunicorn.socket")
    if sock is None or not GONE or not hasattr(select, "poll"):
        return lambda: None
    return watcher.watch(sock, on_gone)


def run_while_connected(request, writer: ReplyWriter) -> Exchange:
    """`writer.run()`, stopping the reply if the client of `request` goes away meanwhile."""
    unwatch = watch_client(request, writer.stop)
    try:
        return writer.run()
    finally:
        unwatch()
