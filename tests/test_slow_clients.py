"""Slow, idle and oversized clients against the real server (gunicorn, chatsite/workers.py) and
model: none of them may hold one of the server's threads. The server here has 4 threads and a
3-second client timeout, so a handful of sockets would be enough to stop it if they could."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from benchmarks.server import REQUEST_TIMEOUT, running
from tests.live_server import ROOT, free_port, post_head

THREADS = 4
CLIENT_TIMEOUT = 3
BOUND = 60  # seconds any one wait may take on a busy machine (no assertion on time)
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # a connection's states (Linux's tcp_info.tcpi_state)


@pytest.fixture(scope="module")
def server():
    with running(
        env={"CHATBOT_WEB_THREADS": str(THREADS), "CHATBOT_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)}
    ) as bench:
        yield bench


def connect(server, *, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(BOUND)
    sock.connect(("127.0.0.1", server.server.port))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection, without reading what it sent first."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state in (TCP_CLOSE, TCP_CLOSE_WAIT):
            return True
        time.sleep(0.1)
    return False


def test_idle_and_half_sent_requests_hold_no_thread(server):
    head = f"Host: 127.0.0.1\r\nAuthorization: Token {server.token}\r\n"
    half_open = []
    for _ in range(16):  # connected, nothing sent
        half_open.append(connect(server))
    for _ in range(32):  # a request line and a header, never the blank line that ends the head
        sock = connect(server)
        sock.sendall(f"GET /accounts/login/ HTTP/1.1\r\n{head}".encode())
        half_open.append(sock)
    for _ in range(16):  # a whole head, and a part of the body it announces
        sock = connect(server)
        sock.sendall(post_head("/api/conversations/", 100, token=server.token) + b'{"title": ')
        half_open.append(sock)

    page = requests.get(f"{server.url}/accounts/login/", timeout=REQUEST_TIMEOUT)
    assert page.status_code == 200
    conversation = server.new_conversation(max_new_tokens=8)
    reply = requests.post(
        f"{server.url}/api/conversations/{conversation}/messages/",
        json={"content": "What is the capital of France?"},
        headers=server.headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["reply"]["status"] == "ok"
    assert reply.json()["reply"]["content"]

    # And the server lets them go once the client timeout has passed.
    assert all(closed_by_server(sock) for sock in half_open)
    for sock in half_open:
        sock.close()


def test_a_request_that_arrives_slowly_but_in_time_is_served(server):
    sock = connect(server)
    request = "GET /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    for start in range(0, len(request), 10):
        sock.sendall(request[start : start + 10].encode())
        time.sleep(CLIENT_TIMEOUT / 2 / (len(request) / 10))
    assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_pipelined_requests_are_each_answered(server):
    sock = connect(server)
    request = b"GET /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock.sendall(request * 2 + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert read_response(sock).count(b"HTTP/1.1 200 OK\r\n") == 3
    sock.close()


def test_a_body_larger_than_any_accepted_is_refused_before_it_is_read(server):
    sock = connect(server)
    sock.sendall(post_head("/api/conversations/import/", 500 * 1024 * 1024, token=server.token))
    status, _, body = read_response(sock).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413 ")
    assert "too large" in json.loads(body)["detail"]
    sock.close()


def test_a_malformed_request_gets_400_and_a_reason(server):
    sock = connect(server)
    sock.sendall(b"GET /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
    status, _, body = read_response(sock).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["detail"].startswith("The request is malformed")
    sock.close()


def test_a_client_waiting_for_100_continue_gets_it_once(server):
    body = json.dumps({"title": "Sent after 100 Continue"}).encode()
    sock = connect(server)
    sock.sendall(
        post_head(
            "/api/conversations/",
            len(body),
            token=server.token,
            Connection="close",
            Expect="100-continue",
        )
    )
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(body)
    response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 201 ")
    assert b"HTTP/1.1 100 Continue" not in response
    sock.close()


def test_clients_that_stop_reading_their_response_are_dropped(server):
    # A conversation whose export (10 MB) is larger than the sockets' buffers between the
    # server and a client that reads nothing.
    server.server.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        "from conversations.models import Conversation, Message; "
        "c = Conversation.objects.create(owner=get_user_model().objects.get(), title='Big'); "
        "[Message.objects.create(conversation=c, role='user', content='word ' * 200_000) "
        "for _ in range(10)]",
    )
    listed = requests.get(f"{server.url}/api/conversations/", headers=server.headers, timeout=10)
    big = next(c["id"] for c in listed.json()["results"] if c["title"] == "Big")
    stalled = []
    for _ in range(THREADS + 2):
        sock = connect(server, receive_buffer=4096)
        sock.sendall(
            f"GET /api/conversations/{big}/export/?format=md HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {server.token}\r\n\r\n".encode()
        )
        stalled.append(sock)
    time.sleep(1)

    page = requests.get(f"{server.url}/accounts/login/", timeout=REQUEST_TIMEOUT)
    assert page.status_code == 200
    # The server gave up on them (with most of the export unsent: none of it was read).
    assert all(closed_by_server(sock) for sock in stalled)
    for sock in stalled:
        sock.close()


def test_a_stopping_server_does_not_wait_for_connections_that_sent_nothing(tmp_path):
    # The worker alone, around a three-line application: what is tested is its event loop.
    (tmp_path / "hello.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'hello']\n"
    )
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "--worker-class=chatsite.workers.BufferedThreadWorker",
            "--threads=2",
            f"--bind=127.0.0.1:{port}",
            "--graceful-timeout=300",
            "--no-control-socket",
            "hello:app",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "CHATBOT_CLIENT_TIMEOUT": "600",
        },
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + BOUND
        while True:
            try:
                assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello"
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        idle = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.5)  # accepted

        server.send_signal(signal.SIGTERM)
        # Neither the 600 s a client may take nor the 300 s a stop may take: it stops at once.
        assert server.wait(timeout=BOUND) == 0
        idle.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
