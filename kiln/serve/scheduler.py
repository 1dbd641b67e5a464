"""One engine's continuous-batching loop on its own thread: requests wait in a bounded queue and join the
running batch (runtimes.batching) at the next step boundary; each step's tokens go back to their listeners.

The engine's `forward` releases the GIL (ONNX Runtime, torch), so the HTTP event loop keeps serving while a
step runs.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from runtimes.batching import ContinuousBatch, Sequence, warm_up

# A listener gets each step's new tokens of its sequence and, on the last call, why it finished.
Listener = Callable[[list[int], "str | None"], None]


class QueueFull(Exception):
    """The wait queue holds `max_queue` requests already: the caller should come back later (HTTP 429)."""


class Scheduler:
    def __init__(self, predictor, *, max_batch: int = 32, max_queue: int = 256):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be at least 1 and max_queue at least 0, got {max_batch} and {max_queue}")
        self.batch = ContinuousBatch(predictor)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Sequence] = deque()
        self.listeners: dict[Sequence, Listener] = {}
        self.cancelled: dict[Sequence, str] = {}
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="kiln-scheduler", daemon=True)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.batch)

    def start(self) -> Scheduler:
        try:
            warm_up(self.batch.predictor, self.max_batch)  # before the first request, not in its time
        except Exception:  # noqa: BLE001  as a failed step in _run: the engine's error, here for a batch this large
            # An engine whose shape profile holds fewer rows (TensorRT) refuses it; the requests that would make
            # such a batch get that error, and the server starts as it did before warming up.
            pass
        self.thread.start()
        return self

    def submit(self, sequence: Sequence, listener: Listener) -> None:
        """Queue `sequence`; `listener` is called from the scheduler thread. QueueFull when the queue is full."""
        with self.condition:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue and len(self.batch) + len(self.waiting) >= self.max_batch:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self.listeners[sequence] = listener
            self.waiting.append(sequence)
            self.condition.notify()

    def cancel(self, sequence: Sequence, reason: str = "cancelled") -> None:
        """Take `sequence` out at the next step boundary (a client went away, a stop string matched)."""
        with self.condition:
            if sequence in self.listeners:
                self.cancelled[sequence] = reason
                self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the sequences already admitted or waiting, refuse new ones, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not (self.waiting or self.batch.rows or self.cancelled or self.stopping):
                    self.condition.wait()
                if self.stopping and not (self.waiting or self.batch.rows):
                    return
                cancelled, self.cancelled = self.cancelled, {}
                for sequence in cancelled:
                    if sequence in self.waiting:
                        self.waiting.remove(sequence)
                joining = []
                while self.waiting and len(self.batch) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            for sequence, reason in cancelled.items():
                sequence.finish_reason = sequence.finish_reason or reason
                self.batch.leave([sequence])
                self._tell(sequence, [])
            try:
                seen = {s: len(s.tokens) for s in self.batch.rows + joining}
                stepped = self.batch.step(joining)
            except Exception as error:  # the engine failed: every sequence in flight ends with the error
                failed = self.batch.rows + joining
                self.batch.leave(self.batch.rows)
                for sequence in failed:
                    sequence.finish_reason = f"error: {error}"
                    self._tell(sequence, [])
                continue
            for sequence in stepped:
                self._tell(sequence, sequence.tokens[seen[sequence]:])

    def _tell(self, sequence: Sequence, tokens: list[int]) -> None:
        listener = self.listeners.get(sequence)
        if sequence.finish_reason:
            listener = self.listeners.pop(sequence, None)
        if listener is not None:
            listener(tokens, sequence.finish_reason)
