"""The gunicorn worker of `make run`: gunicorn's threaded worker, except that each request is
read whole by the worker's event loop before a thread serves it.

gunicorn's own threaded worker reads a request in the thread that serves it, so a client that
sends half a request and waits holds a thread: sixteen such sockets, with no login, stop every
page and reply. Here the event loop reads every connection's bytes as they come, frames them
with h11 (so it knows where a head and a body end, chunked or not) and hands the request to a
thread only once it has all of it; a request that has not arrived whole within
CHATBOT_CLIENT_TIMEOUT seconds is dropped without having cost a thread. Bodies larger than any
the product accepts are refused with 413 before they are read, and the rest are kept in a
temporary file beyond 64 KiB, so idle or slow uploads cost neither threads nor much memory.

In the threads, a client that stops reading its response is given CHATBOT_CLIENT_TIMEOUT
seconds without progress (SO_SNDTIMEO), then dropped: a stalled reader cannot hold a thread
either.

It builds on gunicorn's ThreadWorker (gunicorn is pinned in requirements.txt): `enqueue_req`
is where every connection with a request to read passes, and `handle` where a thread starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import struct
import tempfile
import time
from functools import partial

import h11
from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

# A request's head (its line and header fields) may take this much; browsers' cookies fit well.
HEAD_LIMIT = 64 * 1024
# Bodies up to this size wait in memory; larger ones in a temporary file.
IN_MEMORY = 64 * 1024
# Room for a multipart upload's framing around the largest import the product accepts.
UPLOAD_FRAMING = 1024 * 1024
READ_SIZE = 64 * 1024
# After its last response, a connection is half-closed and the client given this long to close
# its side (what it still sends is read and dropped), so that the response is not cut by a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024


class _Arriving:
    """A request being read: h11 says when it is whole; its bytes are kept as they came, for
    gunicorn's own parser."""

    def __init__(self, deadline: float, body_limit: int) -> None:
        self.deadline = deadline
        self.body_limit = body_limit
        self.framing = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.data = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY)  # noqa: SIM115 (closed by close())
        self.body_size = 0
        self.wants_html = False
        self.continued = False

    def close(self) -> None:
        self.data.close()


class _Connection(TConn):
    """gunicorn's connection, closed without blocking the event loop."""

    def __init__(self, worker: BufferedThreadWorker, *args) -> None:
        super().__init__(*args)
        self.worker = worker
        self.request: _Arriving | None = None  # read whole, for the thread that serves it
        self.continued = False  # "100 Continue" was sent while the request arrived
        self.stalled = False  # the client stopped reading its response

    def close(self, graceful: bool = False) -> None:
        if self.stalled:
            # A reset drops the unsent response at once, instead of the kernel keeping it
            # (megabytes, perhaps) for a client that will not read it.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            util.close(self.sock)
        elif graceful:
            # gunicorn's own graceful close waits for the client in the event loop's thread.
            self.worker.linger(self)
        else:
            util.close(self.sock)


class BufferedThreadWorker(ThreadWorker):
    """gunicorn's threaded worker with requests read whole, without a thread, before serving."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arriving: dict[_Connection, _Arriving] = {}
        self.lingering: dict[_Connection, float] = {}  # the time each is closed at the latest

    def load_wsgi(self) -> None:
        super().load_wsgi()  # loads the application: Django's settings are ready after it
        from django.conf import settings

        self.client_timeout = float(settings.CHATBOT_CLIENT_TIMEOUT)
        self.body_limit = (
            max(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0, settings.CHATBOT_MAX_IMPORT_BYTES)
            + UPLOAD_FRAMING
        )

    @classmethod
    def check_config(cls, cfg, log) -> None:
        super().check_config(cfg, log)
        if cfg.is_ssl:
            log.warning(
                "TLS is served by gunicorn itself: requests are read in their threads, so slow "
                "clients can hold them. Put a proxy that terminates TLS in front instead."
            )

    # -- reading requests in the event loop ------------------------------------------------

    def accept(self, listener) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(
            _Connection(self, self.cfg, client_sock, client_addr, listener.getsockname())
        )

    def enqueue_req(self, conn) -> None:
        # Every connection with a request to read comes here: new, kept alive and readable, or
        # with a pipelined request already buffered behind the last one.
        if conn.request is not None or self.cfg.is_ssl:
            super().enqueue_req(conn)
            return
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        arriving = _Arriving(time.monotonic() + self.client_timeout, self.body_limit)
        self.arriving[conn] = arriving
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_some, conn))
        if leftover:
            self._take(conn, arriving, leftover)

    def _read_some(self, conn, _sock) -> None:
        arriving = self.arriving.get(conn)
        if arriving is None:
            return
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:  # the client closed its side before its request was whole
            self._drop(conn)
            return
        self._take(conn, arriving, data)

    def _take(self, conn, arriving: _Arriving, data: bytes) -> None:
        arriving.data.write(data)
        framing = arriving.framing
        framing.receive_data(data)
        try:
            while True:
                event = framing.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Request):
                    if not self._accept_head(conn, arriving, event):
                        return
                elif isinstance(event, h11.Data):
                    arriving.body_size += len(event.data)
                    if arriving.body_size > arriving.body_limit:
                        self._refuse_too_large(conn, arriving)
                        return
                elif isinstance(event, h11.EndOfMessage):
                    self._hand_over(conn, arriving)
                    return
                else:  # ConnectionClosed, or PAUSED (not before EndOfMessage)
                    self._drop(conn)
                    return
        except h11.RemoteProtocolError as exc:
            self._answer_and_close(
                conn, arriving, exc.error_status_hint, f"The request is malformed: {exc}."
            )

    def _accept_head(self, conn, arriving: _Arriving, request: h11.Request) -> bool:
        accept = b",".join(value for name, value in request.headers if name == b"accept")
        arriving.wants_html = b"text/html" in accept
        length = next((v for n, v in request.headers if n == b"content-length"), None)
        if length is not None and int(length) > arriving.body_limit:
            self._refuse_too_large(conn, arriving)
            return False
        if arriving.framing.client_is_waiting_for_100_continue:
            # The client waits for this before it sends its body; the thread does not repeat it.
            self._send_quietly(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            arriving.continued = True
        return True

    def _hand_over(self, conn, arriving: _Arriving) -> None:
        self._stop_reading(conn)
        arriving.data.seek(0)
        conn.request = arriving
        conn.data_ready = True  # gunicorn's thread then does not wait for data itself
        super().enqueue_req(conn)

    def _refuse_too_large(self, conn, arriving: _Arriving) -> None:
        limit = arriving.body_limit // (1024 * 1024)
        self._answer_and_close(
            conn, arriving, 413, f"The request body is too large: the limit is {limit} MB."
        )

    def _answer_and_close(self, conn, arriving: _Arriving, status: int, detail: str) -> None:
        if arriving.wants_html:
            body, kind = detail.encode(), b"text/plain; charset=utf-8"
        else:
            body, kind = json.dumps({"detail": detail}).encode(), b"application/json"
        reason = _REASONS.get(status, "Error").encode()
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            status,
            reason,
            kind,
            len(body),
        )
        self._send_quietly(conn, head + b"Connection: close\r\n\r\n" + body)
        self.log.info("Refused a request from %s: %d %s", _address(conn), status, detail)
        self._drop(conn)

    def _send_quietly(self, conn, data: bytes) -> None:
        # Short answers fit the socket's send buffer; a client that reads nothing loses them.
        with contextlib.suppress(OSError):
            conn.sock.send(data)

    def _stop_reading(self, conn) -> _Arriving | None:
        arriving = self.arriving.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        return arriving

    def _drop(self, conn) -> None:
        arriving = self._stop_reading(conn)
        if arriving is not None:
            arriving.close()
        self.nr_conns -= 1
        conn.close()

    # -- closing ---------------------------------------------------------------------------

    def linger(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            util.close(conn.sock)
            return
        conn.sock.setblocking(False)
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._drain, conn))

    def _drain(self, conn: _Connection, _sock) -> None:
        try:
            more = len(conn.sock.recv(LINGER_BYTES)) > 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            more = False
        if not more:
            self._end_linger(conn)

    def _end_linger(self, conn: _Connection) -> None:
        del self.lingering[conn]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        util.close(conn.sock)

    def murder_pending(self) -> None:
        # Runs about once a second in the event loop, while serving and while stopping.
        super().murder_pending()
        now = time.monotonic()
        late = [conn for conn, arriving in self.arriving.items() if arriving.deadline <= now]
        for conn in late:
            self.log.info(
                "Closed a connection from %s: no whole request within %g s",
                _address(conn),
                self.client_timeout,
            )
            self._drop(conn)
        for conn in [conn for conn, deadline in self.lingering.items() if deadline <= now]:
            self._end_linger(conn)
        if not self.alive:
            # Stopping: connections that have sent nothing yet are not waited for.
            for conn in [
                conn for conn, arriving in self.arriving.items() if not arriving.data.tell()
            ]:
                self._drop(conn)

    # -- serving in a thread ---------------------------------------------------------------

    def handle(self, conn):
        arriving, conn.request = conn.request, None
        if arriving is None:
            return super().handle(conn)
        with arriving.data:
            data = arriving.data.read()
        conn.sock.setblocking(True)
        # A stalled reader of the response gets as long as a slow sender of the request. (The
        # thread reads nothing from the socket; the receive timeout only bounds a disagreement
        # between h11 and gunicorn's parser on where a request ends.)
        seconds = int(self.client_timeout)
        timeval = struct.pack("ll", seconds, int((self.client_timeout - seconds) * 1e6))
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        conn.init()  # the parser, once per connection
        conn.parser.unreader.unread(data)
        conn.continued = arriving.continued
        return super().handle(conn)

    def handle_request(self, req, conn):
        if conn.continued:
            req._expected_100_continue = False  # already answered while the body arrived
            conn.continued = False
        try:
            return super().handle_request(req, conn)
        except BlockingIOError:
            # The send timeout ran out: gunicorn would log it as a server error with its trace.
            conn.stalled = True
            self.log.info(
                "Closed a connection from %s: it stalled for %g s",
                _address(conn),
                self.client_timeout,
            )
            raise StopIteration from None


_REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}


def _address(conn) -> str:
    client = conn.client
    return client[0] if isinstance(client, tuple) else str(client)
