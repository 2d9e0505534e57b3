"""gunicorn settings for `make run`: one process owns the model; threads serve pages meanwhile."""

import os
import threading

from chatsite.env import env_batch_size, env_int, env_str

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


def post_worker_init(worker):
    # Load the model in the background so the first message does not wait for it.
    from conversations.runtime import get_engine

    def warm():
        try:
            get_engine().load()
            worker.log.info("Model loaded.")
        except Exception as exc:  # the message names the setting to fix
            worker.log.error("Model could not be loaded: %s", exc)

    threading.Thread(target=warm, name="model-warmup", daemon=True).start()
