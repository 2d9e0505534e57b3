"""The product as a user runs it: a gunicorn process serving the real bundled model on a free
127.0.0.1 port, with its own var dir (SQLite database, logs). Shared by the end-to-end tests,
the browser tests and scripts/screenshots.py. Where DATABASE_URL names a PostgreSQL database
(`make test-postgres`), each var dir has a database of its own on that server instead."""

import atexit
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

ROOT = Path(__file__).resolve().parent.parent

# Debian's Chromium, headless, kept off the network (this machine has none to offer).
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_head(path: str, length: int, *, token: str = "", **headers: str) -> bytes:
    """The head of a POST of `length` bytes of JSON to a server on 127.0.0.1, for tests that
    write requests on a raw socket (to send them in parts, or never whole), with `headers`
    added."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: Token {token}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _model_cache() -> str:
    """Where the bundled model is unpacked: the cache of the settings this process runs with
    (outside a test run, the repository's own var/models)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    from django.conf import settings

    return str(settings.CHATBOT_MODEL_CACHE)


class OwnPostgresDatabase:
    """The database of one var dir on the PostgreSQL server of `base_url`, as a fresh SQLite
    file is on SQLite: created by prepare(), dropped when this process exits (forcibly: a
    killed server may have left connections behind)."""

    def __init__(self, base_url: str, var_dir: Path) -> None:
        self.base_url = base_url
        parts = urlsplit(base_url)
        digest = hashlib.sha1(str(var_dir.resolve()).encode()).hexdigest()[:12]
        self.name = f"{parts.path.lstrip('/')}_server_{digest}"
        self.url = urlunsplit(parts._replace(path=f"/{self.name}"))

    def _run(self, sql: str) -> None:
        import psycopg
        from psycopg import sql as q

        with psycopg.connect(self.base_url, autocommit=True) as db:
            db.execute(q.SQL(sql).format(q.Identifier(self.name)))

    def create(self) -> None:
        self._run("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self._run("CREATE DATABASE {}")
        atexit.register(self._run, "DROP DATABASE IF EXISTS {} WITH (FORCE)")


def own_postgres_database(var_dir: Path, env: dict[str, str]) -> OwnPostgresDatabase | None:
    """A var dir's own database where the environment's DATABASE_URL is PostgreSQL's (and the
    caller did not choose a database itself); None on SQLite."""
    url = os.environ.get("DATABASE_URL", "")
    if "DATABASE_URL" in env or not url.startswith(("postgres://", "postgresql://")):
        return None
    return OwnPostgresDatabase(url, var_dir)


def shared_database_url() -> str:
    """The test database (pytest-django's, on PostgreSQL), as server processes reach it."""
    from django.db import connection

    db = connection.settings_dict
    return (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}"
    )


class Server:
    """A gunicorn process of the product on its own port, database and var dir (servers given
    one var dir share its database).

    `env` adds to or overrides the server's environment (e.g. CHATBOT_MAX_NEW_TOKENS)."""

    def __init__(self, var_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CHATBOT_VAR_DIR": str(var_dir),
            "CHATBOT_MODEL_CACHE": _model_cache(),
            "CHATBOT_BIND": f"127.0.0.1:{self.port}",
            "CHATBOT_MAX_NEW_TOKENS": "48",
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            **(env or {}),
        }
        self.database = own_postgres_database(var_dir, env or {})
        if self.database:
            self.env["DATABASE_URL"] = self.database.url
        self.process = None
        self.log = var_dir / "server.log"

    def manage(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def prepare(self) -> None:
        """Create the database and collect the static files, as `make run` does."""
        if self.database:
            self.database.create()
        self.manage("migrate", "--noinput")
        self.manage("collectstatic", "--noinput")

    def start(self) -> None:
        gunicorn = Path(sys.executable).parent / "gunicorn"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(gunicorn), "--config", "chatsite/gunicorn.conf.py", "chatsite.wsgi"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so kill() reaches the workers
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.url}/accounts/login/", timeout=2).status_code == 200:
                    return
            # (Not listening yet, or too busy starting to answer at once: a machine whose cores
            # are busy may take longer than the 2 s of one try.)
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.3)
        raise AssertionError("server did not start:\n" + self.log.read_text())

    def kill(self) -> None:
        """SIGKILL the master and its workers: no shutdown code runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
