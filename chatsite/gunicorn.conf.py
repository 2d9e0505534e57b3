"""gunicorn settings for `make run`: one process owns the model; threads serve pages meanwhile."""

import atexit
import gc
import os
import shutil
import tempfile
import threading

from chatsite.env import env_batch_size, env_bool, env_int, env_str

bind = env_str("CHATBOT_BIND", "127.0.0.1:8000")
# Each worker process holds its own copy of the model, so one is the default. (gunicorn reads
# WEB_CONCURRENCY too, before this file, with a bare int(): its traceback shows the variable.)
workers = env_int("WEB_CONCURRENCY", 1)
# gunicorn's threaded worker, with requests read whole before a thread serves them: slow or
# idle clients cost no thread.
worker_class = "chatsite.workers.BufferedThreadWorker"
# A streaming reply holds its thread until it ends: twice the replies the model writes at once
# (CHATBOT_BATCH_SIZE) leaves as many threads for pages, stop requests and new messages while a
# full batch streams (with only as many, those waited for a reply to end).
threads = env_int("CHATBOT_WEB_THREADS", 2 * env_batch_size())
timeout = 120
graceful_timeout = 30
accesslog = "-"
# No runtime control socket: several servers (tests, a second checkout) may run side by side.
control_socket_disable = True


# Metrics (CHATBOT_METRICS): every worker writes its figures into files in one folder, and a
# scrape, whichever worker answers it, adds up all of theirs (prometheus-client's multiprocess
# mode, chosen by this variable before the workers import it). A new folder for each start of
# the server, so that counts begin at zero; removed when the server stops. An operator's own
# PROMETHEUS_MULTIPROC_DIR is kept (and left in place).
if env_bool("CHATBOT_METRICS", False) and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics_dir = tempfile.mkdtemp(prefix="chatbot-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    _server_pid = os.getpid()

    def _remove_metrics_dir():
        if os.getpid() == _server_pid:  # (not a worker leaving: they run this too)
            shutil.rmtree(_metrics_dir, ignore_errors=True)

    atexit.register(_remove_metrics_dir)


def child_exit(server, worker):
    # A worker ended: its replies in flight no longer count. (Its counters still do.)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_starting(server):
    # Replies whose server died mid-reply are marked "interrupted" by whoever next looks at their
    # conversation (their lease ran out); this only tidies the log at start. Replies another
    # server is still writing on the same database keep their live leases.
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    django.setup()
    from conversations.services import interrupt_dead_replies

    if count := interrupt_dead_replies():
        server.log.info("Marked %d unfinished replies as interrupted.", count)
    # The workers are forked from this process: none may inherit its connections (or its
    # PostgreSQL pool, whose threads a fork does not copy).
    from django.db import connection, connections

    connections.close_all()
    if connection.vendor == "postgresql":
        connection.close_pool()


def post_worker_init(worker):
    # Python's cycle collector stops every thread while it runs. The application just loaded
    # never becomes garbage, so it is set aside (gc.freeze), and young objects are collected
    # after 50,000 allocations instead of 700: relaying 256 streams, the default paused the
    # process a thousand times in 40 s, up to 0.3 s at a time (docs/benchmarks.md).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)

    # Load the model in the background so the first message does not wait for it.
    from conversations.runtime import get_engine

    def warm():
        try:
            get_engine().load()
            worker.log.info("Model loaded.")
        except Exception as exc:  # the message names the setting to fix
            worker.log.error("Model could not be loaded: %s", exc)

    threading.Thread(target=warm, name="model-warmup", daemon=True).start()
