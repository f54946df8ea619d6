"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that several servers
in one process (tests) do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Requests (by endpoint and status), errors, client disconnects mid-body, request latency, forward batches (items, tokens,
    seconds) and the scored-token throughput. ``tokens/s`` over any window is
    ``rate(qrm_scored_tokens_total[w])``; ``qrm_tokens_per_second`` is that of the last batch."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qrm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("qrm_request_errors", "HTTP requests answered with a 4xx/5xx status",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("qrm_request_latency_seconds", "time from request to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("qrm_batch_size_items", "sequences per dynamic batch", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.batch_tokens = Histogram("qrm_batch_tokens", "prompt + response tokens per dynamic batch",
                                      buckets=tuple(b * 64 for b in BATCH_BUCKETS), registry=r)
        self.batch_seconds = Histogram("qrm_batch_forward_seconds", "model time of one dynamic batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.scored_tokens = Counter("qrm_scored_tokens", "prompt + response tokens scored", registry=r)
        self.scored_items = Counter("qrm_scored_items", "sequences scored", registry=r)
        self.tokens_per_second = Gauge("qrm_tokens_per_second", "tokens/s of the last dynamic batch", registry=r)
        self.queue_depth = Gauge("qrm_queue_items", "sequences waiting for a batch", registry=r)
        self.client_disconnects = Counter("qrm_client_disconnects", "requests whose client disconnected before "
                                          "sending its whole body (not answered, not an error)", ["endpoint"],
                                          registry=r)
        self.in_flight = Gauge("qrm_requests_in_flight", "requests being answered", registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, items: int, tokens: int, seconds: float) -> None:
        self.batch_items.observe(items)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.scored_tokens.inc(tokens)
        self.scored_items.inc(items)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
