"""A kiln serve app on a free loopback port in a thread, and an engine slowed down to hold its slots."""
from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def live_server(app):
    """Serve `app` with uvicorn on 127.0.0.1:<free port>; yields the base URL, stops (draining) on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class SlowEngine:
    """The engine itself, each forward pass delayed: requests stay in flight long enough to disconnect,
    overfill the queue or shut down under them."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay = engine, delay
        self.signature = engine.signature

    def forward(self, feeds):
        time.sleep(self.delay)
        return self.engine.forward(feeds)

    def shared_steps(self, *args, **kwargs):
        """The engine's in-place decode steps (SLOT engines), each delayed too."""
        steps = self.engine.shared_steps(*args, **kwargs)
        return None if steps is None else SlowSteps(steps, self.delay)


class SlowSteps:
    def __init__(self, steps, delay: float):
        self.steps, self.delay = steps, delay

    def __getattr__(self, name):
        return getattr(self.steps, name)

    def step(self, new_ids, keep: bool = True):
        time.sleep(self.delay)
        return self.steps.step(new_ids, keep)


def slow_down(app, delay: float) -> None:
    batch = app.state.service.scheduler.batch
    batch.predictor = SlowEngine(batch.predictor, delay)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
