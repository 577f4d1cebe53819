"""Prometheus metrics of groundloop (names prefixed ``groundloop_``).

One ``Metrics`` object per server, on an injectable registry so tests do not
collide. It also implements the sandbox engine's hooks (``EngineHooks``).

Naming follows the Prometheus conventions: base units (seconds, bytes) as a
plural suffix, counters exposed with ``_total`` (prometheus_client appends it
to the names below), one quantity per metric.

Labels are bounded: no user ids, session ids, request ids, paths or code ever
appear in a label. The helper methods (``execution_done``, ``request_done``,
``error``, ...) clamp every label value to a fixed set (the tuples below:
request types and error codes are derived from the wire contract,
sessions/protocol.py and sessions/errors.py), anything else becoming
``other``; outside this module, call them rather than ``.labels()``.

The exported families (what ``deploy/grafana/dashboards/groundloop.json``
queries; tests/server/test_metrics.py checks the two agree):

=============================================  =========  =========================
family                                         type       labels
=============================================  =========  =========================
groundloop_execution_seconds                   histogram  kind, language, outcome
groundloop_first_output_seconds                histogram  kind
groundloop_sandbox_acquire_seconds             histogram  source
groundloop_sandbox_start_seconds               histogram
groundloop_model_first_token_seconds           histogram
groundloop_model_generation_seconds            histogram
groundloop_assist_iterations                   histogram
groundloop_ws_send_queue_wait_seconds          histogram
groundloop_request_duration_seconds            histogram  type
groundloop_connections                         gauge
groundloop_sessions                            gauge
groundloop_sandboxes                           gauge      state
groundloop_sandbox_pool_size                   gauge
groundloop_sandbox_pool_free                   gauge
groundloop_requests_in_flight                  gauge
groundloop_build_info                          gauge      version
groundloop_requests_total                      counter    type, outcome
groundloop_errors_total                        counter    code
groundloop_ws_frames_sent_total                counter
groundloop_ws_sent_bytes_total                 counter
groundloop_output_truncations_total            counter
groundloop_model_tokens_total                  counter    direction
groundloop_containers_reaped_total             counter
groundloop_replayed_frames_total               counter
groundloop_egress_connections_total            counter    verdict
groundloop_egress_bytes_total                  counter    direction
=============================================  =========  =========================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from groundloop.sandbox.engine import EngineHooks
from groundloop.sessions.errors import ERROR_CODES as PROTOCOL_ERROR_CODES
from groundloop.sessions.inflight import outcome_of
from groundloop.sessions.protocol import EXECUTIONS, SPECS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "groundloop_"

# Sub-millisecond work must be visible: a warm pool pop or a queued frame takes
# microseconds, a trivial run_code about a millisecond. From 50 us to 60 s.
FAST_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Container starts and model calls: tens of milliseconds to minutes.
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
ITERATION_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10)

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER = "other"

# The bounded label values. Anything else is counted as "other".
KIND_LABELS = ("run_code", "exec")
LANGUAGE_LABELS = ("python", "javascript", "typescript", "bash", "shell")
# "unavailable": no sandbox could be had; "internal": a server bug ended the request.
OUTCOME_LABELS = ("ok", "error", "timeout", "cancelled", "lost", "unavailable", "internal")
SOURCE_LABELS = ("pool", "cold")
STATE_LABELS = ("warm", "starting", "in_use", "removing")
DIRECTION_LABELS = ("input", "output")
EGRESS_VERDICT_LABELS = ("allowed", "refused", "failed")  # sandbox/egress.py EgressRecord.verdict
EGRESS_DIRECTION_LABELS = ("out", "in")  # out: sandbox to remote
# Derived from the wire contract, so a new request type or error code is counted under its own name.
# Besides the protocol's requests: the HTTP validate-code, and "rejected" (a request refused before it
# ran, counted with its protocol error code as outcome).
REQUEST_TYPES = (*SPECS, "validate_code", "rejected")
ERROR_CODES = tuple(PROTOCOL_ERROR_CODES)
# A request answered without running (a refusal, a cancel): its outcome, or the error code it was refused with.
ANSWERED_OUTCOME_LABELS = OUTCOME_LABELS + ERROR_CODES
# First output, by request type: the requests that run code (assist's first output is its code's).
FIRST_OUTPUT_KINDS = tuple(t for t in SPECS if t in EXECUTIONS)


def bounded(value: Any, allowed: Iterable[str]) -> str:
    """``value`` when it is one of ``allowed``, else ``"other"``."""
    return value if isinstance(value, str) and value in allowed else OTHER


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("groundloop")
    except Exception:
        return "unknown"


class Metrics(EngineHooks):
    """Every groundloop metric, registered on ``registry`` (a fresh one by default).

    The attributes are the prometheus_client objects; the methods are the
    label-safe way to update them. The attribute names are the server's API.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        # ---- histograms (seconds unless said otherwise)
        self.execution = Histogram(
            p + "execution_seconds",
            "Server-side duration of run_code and exec requests, from dispatch to the agent's done",
            ["kind", "language", "outcome"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.first_output = Histogram(
            p + "first_output_seconds",
            "Time from dispatching a request to its first output line or result",
            ["kind"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.acquire = Histogram(
            p + "sandbox_acquire_seconds",
            "Time to hand a started sandbox to a session, by source (pool or cold)",
            ["source"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.cold_start = Histogram(
            p + "sandbox_start_seconds",
            "Time to create, start and handshake one sandbox container",
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.model_ttft = Histogram(
            p + "model_first_token_seconds",
            "Time from sending a model request to its first streamed token",
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.model_generation = Histogram(
            p + "model_generation_seconds",
            "Duration of one model call, from request to the end of its stream",
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.assist_iterations = Histogram(
            p + "assist_iterations",
            "Model/execution iterations per assist request",
            buckets=ITERATION_BUCKETS,
            registry=r,
        )
        self.send_wait = Histogram(
            p + "ws_send_queue_wait_seconds",
            "Time the oldest frame of each socket write waited in the WebSocket send queue",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Duration of every client request, from receipt to its done frame",
            ["type"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        # ---- gauges
        self.connections = Gauge(p + "connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge(p + "sessions", "Live sessions, attached or waiting for resume", registry=r)
        self.sandboxes = Gauge(
            p + "sandboxes",
            "Sandboxes of this server by state (warm, starting, in_use, removing)",
            ["state"],
            registry=r,
        )
        self.pool_size = Gauge(p + "sandbox_pool_size", "Configured warm pool size", registry=r)
        self.pool_free = Gauge(p + "sandbox_pool_free", "Warm sandboxes ready to hand out", registry=r)
        self.inflight = Gauge(p + "requests_in_flight", "Client requests in flight, all sessions", registry=r)
        self.build_info = Gauge(p + "build_info", "groundloop version (always 1)", ["version"], registry=r)
        # ---- counters (exposed with the _total suffix)
        self.requests = Counter(
            p + "requests", "Client requests finished, by type and outcome", ["type", "outcome"], registry=r
        )
        self.errors = Counter(
            p + "errors", "Error frames sent and failed requests, by protocol error code", ["code"], registry=r
        )
        self.frames_out = Counter(p + "ws_frames_sent", "Frames sent to clients (replays included)", registry=r)
        self.bytes_out = Counter(p + "ws_sent_bytes", "Bytes of frames sent to clients", registry=r)
        self.truncations = Counter(
            p + "output_truncations", "Requests whose output was cut at max_output_bytes", registry=r
        )
        self.tokens = Counter(
            p + "model_tokens", "Model tokens, by direction (input, output)", ["direction"], registry=r
        )
        self.reaped = Counter(p + "containers_reaped", "Orphan sandbox containers removed at start-up", registry=r)
        self.replayed = Counter(p + "replayed_frames", "Frames replayed to resuming clients", registry=r)
        self.egress_connections = Counter(
            p + "egress_connections",
            "Connections sandboxes asked the egress proxy for, by verdict (allowed, refused, failed)",
            ["verdict"],
            registry=r,
        )
        self.egress_bytes = Counter(
            p + "egress_bytes",
            "Bytes through the egress proxy, by direction (out: to the remote)",
            ["direction"],
            registry=r,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see _child
        self._initialise()

    def _initialise(self) -> None:
        """Create the bounded label children up front so every series exists at 0 (rate() needs a start)."""
        self.build_info.labels(_version()).set(1)
        for state in STATE_LABELS:
            self.sandboxes.labels(state).set(0)
        for source in SOURCE_LABELS:
            self.acquire.labels(source)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for kind in KIND_LABELS:
            self.first_output.labels(kind)
        for direction in DIRECTION_LABELS:
            self.tokens.labels(direction)
        for verdict in EGRESS_VERDICT_LABELS:
            self.egress_connections.labels(verdict)
        for direction in EGRESS_DIRECTION_LABELS:
            self.egress_bytes.labels(direction)

    # ---- EngineHooks

    def sandbox_acquired(self, source: str, seconds: float) -> None:
        self.acquire.labels(bounded(source, SOURCE_LABELS)).observe(seconds)

    def sandbox_started(self, seconds: float) -> None:
        self.cold_start.observe(seconds)

    def sandboxes_changed(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.sandboxes.labels(bounded(state, STATE_LABELS)).set(n)
        self.pool_free.set(counts.get("warm", 0))

    def containers_reaped(self, n: int) -> None:
        self.reaped.inc(n)

    # ---- helpers for the server (label-safe)

    def set_pool_size(self, n: int) -> None:
        """Record the configured pool size (call once the engine exists: ``engine.pool_size``)."""
        self.pool_size.set(n)

    def execution_done(
        self, kind: str, language: str | None, outcome: str, seconds: float, truncated: bool = False
    ) -> None:
        """One run_code or exec finished. ``outcome`` is one of OUTCOME_LABELS (see ``outcome_of``)."""
        if kind == "exec" and not language:
            language = "shell"
        self._child(
            self.execution,
            bounded(kind, KIND_LABELS),
            bounded(language, LANGUAGE_LABELS),
            bounded(outcome, OUTCOME_LABELS),
        ).observe(seconds)
        if truncated:
            self.truncations.inc()

    def first_output_seen(self, kind: str, seconds: float) -> None:
        """The first output line of a request (``kind``: its type), seconds after it arrived."""
        self._child(self.first_output, bounded(kind, FIRST_OUTPUT_KINDS)).observe(seconds)

    def request_done(self, type_: str, outcome: str, seconds: float) -> None:
        """Any client request finished (its done frame was queued)."""
        type_ = bounded(type_, REQUEST_TYPES)
        self._child(self.requests, type_, bounded(outcome, OUTCOME_LABELS)).inc()
        self._child(self.request_duration, type_).observe(seconds)

    def request_answered(self, type_: str, outcome: str) -> None:
        """A request answered without running (a cancel, or one refused: ``outcome`` is then its
        protocol error code); counted, with no duration."""
        self._child(self.requests, bounded(type_, REQUEST_TYPES), bounded(outcome, ANSWERED_OUTCOME_LABELS)).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: labels() costs microseconds a call, and the values
        here are bounded, so the cache is too."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def error(self, code: str) -> None:
        """An error frame or a failed request, by protocol error code."""
        self._child(self.errors, bounded(code, ERROR_CODES)).inc()

    def frame_sent(self, nbytes: int, queue_wait_s: float | None = None) -> None:
        """A frame was written to a client; ``queue_wait_s`` is how long it waited in the send queue."""
        self.frames_out.inc()
        self.bytes_out.inc(nbytes)
        if queue_wait_s is not None:
            self.send_wait.observe(queue_wait_s)

    def frames_replayed(self, n: int) -> None:
        if n > 0:
            self.replayed.inc(n)

    def model_call_done(
        self, first_token_s: float | None, generation_s: float, input_tokens: int = 0, output_tokens: int = 0
    ) -> None:
        """One model call ended (``first_token_s`` is None when no token came)."""
        if first_token_s is not None:
            self.model_ttft.observe(first_token_s)
        self.model_generation.observe(generation_s)
        if input_tokens:
            self._child(self.tokens, "input").inc(input_tokens)
        if output_tokens:
            self._child(self.tokens, "output").inc(output_tokens)

    def egress_done(self, verdict: str, bytes_out: int, bytes_in: int) -> None:
        """One egress connection ended (sessions/egress.py)."""
        self._child(self.egress_connections, bounded(verdict, EGRESS_VERDICT_LABELS)).inc()
        if bytes_out:
            self._child(self.egress_bytes, "out").inc(bytes_out)
        if bytes_in:
            self._child(self.egress_bytes, "in").inc(bytes_in)

    def assist_done(self, iterations: int) -> None:
        self.assist_iterations.observe(iterations)

    # ---- exposition

    def exposition(self) -> bytes:
        """The Prometheus text exposition (content type ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def families(self) -> dict[str, str]:
        """Exported family name -> type ("histogram", "gauge", "counter"), as Prometheus will see them."""
        out: dict[str, str] = {}
        for family in self.registry.collect():
            name = family.name + "_total" if family.type == "counter" else family.name
            out[name] = family.type
        return out


__all__ = [
    "Metrics",
    "CONTENT_TYPE",
    "FAST_BUCKETS",
    "SLOW_BUCKETS",
    "bounded",
    "outcome_of",
    "REQUEST_TYPES",
    "ERROR_CODES",
    "OUTCOME_LABELS",
    "KIND_LABELS",
    "LANGUAGE_LABELS",
    "FIRST_OUTPUT_KINDS",
]
