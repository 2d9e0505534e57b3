"""What tests of the engine's model thread share: a short chat to prompt with, and replies
handed to the scheduler so that it lets them in together."""

import threading


def chat(text):
    return [{"role": "system", "content": "be good"}, {"role": "user", "content": text}]


def submit_together(engine, requests):
    """Queue `requests` while the model thread is held, so that it admits them together, and
    wait until they are written."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        holding.set()
        release.wait(timeout=30)

    held = engine.scheduler.call(hold)
    assert holding.wait(timeout=30)
    for request in requests:
        engine.scheduler.submit(request)
    release.set()
    held.result(timeout=30)
    for request in requests:
        assert request.done.wait(timeout=60)
