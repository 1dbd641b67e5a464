"""The server's Prometheus metrics, in a registry of its own (several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; decode steps of small engines on a CPU take milliseconds, large ones on a busy server seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "HTTP requests to the API by response status",
                                ["status"], registry=self.registry)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generated_tokens = Counter("kiln_generated_tokens", "Tokens generated", registry=self.registry)
        queue = Gauge("kiln_queue_depth", "Requests waiting to join the batch", registry=self.registry)
        queue.set_function(lambda: scheduler.queue_depth)
        active = Gauge("kiln_active_sequences", "Sequences in the running batch", registry=self.registry)
        active.set_function(lambda: scheduler.active)
        self.time_to_first_token = Histogram("kiln_time_to_first_token_seconds", "Request arrival to its first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("kiln_inter_token_latency_seconds", "Time between a sequence's tokens",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
