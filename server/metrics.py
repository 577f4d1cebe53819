"""Prometheus metrics of groundloop (names prefixed ``groundloop_``).

One ``Metrics`` object per server, on an injectable registry so tests do not
collide. It also implements the sandbox engine's hooks. Labels are bounded:
no user ids, session ids or code ever appear in a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sandbox.engine import EngineHooks

# Sub-millisecond work must be visible: start at 100 us.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075, 0.01, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(EngineHooks):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "groundloop_"
        # histograms (seconds)
        self.execution = Histogram(p + "execution_seconds", "Execution time of run_code and exec, server side",
                                   ["kind", "language", "outcome"], buckets=FAST_BUCKETS, registry=r)
        self.first_output = Histogram(p + "first_output_seconds", "Time from request to its first output line",
                                      ["kind"], buckets=FAST_BUCKETS, registry=r)
        self.acquire = Histogram(p + "sandbox_acquire_seconds", "Time to hand a sandbox to a session",
                                 ["source"], buckets=FAST_BUCKETS, registry=r)
        self.cold_start = Histogram(p + "sandbox_start_seconds", "Time to start and handshake one sandbox",
                                    buckets=SLOW_BUCKETS, registry=r)
        self.model_ttft = Histogram(p + "model_first_token_seconds", "Model time to first token",
                                    buckets=SLOW_BUCKETS, registry=r)
        self.model_generation = Histogram(p + "model_generation_seconds", "Model generation time per call",
                                          buckets=SLOW_BUCKETS, registry=r)
        self.assist_iterations = Histogram(p + "assist_iterations", "Tries per assist request",
                                           buckets=(1, 2, 3, 4, 5, 8, 10), registry=r)
        self.send_wait = Histogram(p + "ws_send_queue_wait_seconds", "Time a frame waits before it is sent",
                                   buckets=FAST_BUCKETS, registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "Duration of every request by type",
                                          ["type"], buckets=FAST_BUCKETS, registry=r)
        # gauges
        self.connections = Gauge(p + "connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge(p + "sessions", "Live sessions", registry=r)
        self.sandboxes = Gauge(p + "sandboxes", "Sandboxes by state", ["state"], registry=r)
        self.pool_size = Gauge(p + "pool_size", "Configured warm pool size", registry=r)
        self.pool_free = Gauge(p + "pool_free", "Warm sandboxes ready to hand out", registry=r)
        self.inflight = Gauge(p + "requests_in_flight", "Requests in flight", registry=r)
        # counters
        self.requests = Counter(p + "requests", "Requests by type and outcome", ["type", "outcome"], registry=r)
        self.errors = Counter(p + "errors", "Error frames and failed requests by code", ["code"], registry=r)
        self.frames_out = Counter(p + "frames_out", "Frames sent to clients", registry=r)
        self.bytes_out = Counter(p + "bytes_out", "Bytes sent to clients", registry=r)
        self.truncations = Counter(p + "output_truncations", "Requests whose output was truncated", registry=r)
        self.tokens = Counter(p + "model_tokens", "Model tokens", ["direction"], registry=r)
        self.reaped = Counter(p + "containers_reaped", "Containers removed by reaping", registry=r)
        self.replayed = Counter(p + "replayed_frames", "Frames replayed on resume", registry=r)

    # ---- EngineHooks

    def sandbox_acquired(self, source: str, seconds: float) -> None:
        self.acquire.labels(source).observe(seconds)

    def sandbox_started(self, seconds: float) -> None:
        self.cold_start.observe(seconds)

    def sandboxes_changed(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.sandboxes.labels(state).set(n)
        self.pool_free.set(counts.get("warm", 0))

    def containers_reaped(self, n: int) -> None:
        self.reaped.inc(n)

    # ---- exposition

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
