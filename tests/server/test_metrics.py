"""Metrics: names, bounded labels, promtool, the dashboard's queries, and real work moving them.

The HTTP scrape of a running server lives in tests/server/test_metrics_http.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from groundloop.server.metrics import ERROR_CODES, OTHER, Metrics, bounded, outcome_of
from prometheus_client import CollectorRegistry
from support.env import sandbox_settings
from support.metrics import DASHBOARD, NAME_RE, dashboard_queries, resolve, samples, total

ROOT = Path(__file__).resolve().parents[2]
REQUIRE = os.environ.get("GROUNDLOOP_REQUIRE_DOCKER") == "1"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if REQUIRE:
            pytest.fail("promtool is missing (CI installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def busy_metrics() -> Metrics:
    """A Metrics with every helper used once, so every family has samples."""
    m = Metrics()
    m.set_pool_size(2)
    m.sandbox_acquired("pool", 0.00004)
    m.sandbox_acquired("cold", 0.8)
    m.sandbox_started(0.7)
    m.sandboxes_changed({"warm": 1, "starting": 1, "in_use": 2, "removing": 1})
    m.containers_reaped(3)
    m.execution_done("run_code", "python", "ok", 0.0009)
    m.execution_done("exec", None, "error", 0.02, truncated=True)
    m.first_output_seen("run_code", 0.0004)
    m.request_done("run_code", "ok", 0.001)
    m.request_done("write_file", "error", 0.0002)
    m.error("bad_request")
    m.frame_sent(120, queue_wait_s=0.00002)
    m.frames_replayed(5)
    m.model_call_done(0.4, 2.5, input_tokens=1000, output_tokens=200)
    m.assist_done(2)
    m.connections.inc()
    m.sessions.inc()
    m.inflight.inc()
    return m


# ---- without Docker


def test_registries_are_independent():
    a, b = Metrics(), Metrics(CollectorRegistry())
    a.request_done("ping", "ok", 0.0001)
    assert total(a.exposition(), "groundloop_requests_total") == 1
    assert total(b.exposition(), "groundloop_requests_total") == 0


# The attributes the server and sessions code against, with their label names.
ATTRIBUTES = {
    "execution": ("kind", "language", "outcome"),
    "first_output": ("kind",),
    "acquire": ("source",),
    "cold_start": (),
    "model_ttft": (),
    "model_generation": (),
    "assist_iterations": (),
    "send_wait": (),
    "request_duration": ("type",),
    "connections": (),
    "sessions": (),
    "sandboxes": ("state",),
    "pool_size": (),
    "pool_free": (),
    "inflight": (),
    "requests": ("type", "outcome"),
    "errors": ("code",),
    "frames_out": (),
    "bytes_out": (),
    "truncations": (),
    "tokens": ("direction",),
    "reaped": (),
    "replayed": (),
}


def test_attribute_api():
    m = Metrics()
    for attr, labels in ATTRIBUTES.items():
        assert tuple(getattr(m, attr)._labelnames) == labels, attr


def test_every_family_is_prefixed_and_in_base_units():
    families = Metrics().families()
    assert len(families) >= 24
    for name, kind in families.items():
        assert name.startswith("groundloop_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        assert "millis" not in name and "_ms" not in name, name
        if kind == "histogram" and name != "groundloop_assist_iterations":
            assert name.endswith("_seconds"), name


def test_histograms_resolve_sub_millisecond_work():
    m = Metrics()
    for hist in (m.execution, m.first_output, m.acquire, m.send_wait, m.request_duration):
        bounds = [b for b in hist._upper_bounds if b != float("inf")]
        assert sum(1 for b in bounds if b < 0.001) >= 4, hist._name
        assert bounds[-1] >= 30, hist._name


def test_labels_are_bounded():
    m = Metrics()
    m.request_done("run_code; rm -rf /", "ok", 0.1)
    m.request_done("run_code", "user alice failed", 0.1)
    m.execution_done("exec", "cobol", "ok", 0.1)
    m.error("session 4f2a9c not found")
    m.sandbox_acquired("somewhere", 0.1)
    text = m.exposition().decode()
    assert total(text, "groundloop_requests_total", type=OTHER, outcome="ok") == 1
    assert total(text, "groundloop_requests_total", type="run_code", outcome=OTHER) == 1
    assert total(text, "groundloop_execution_seconds_count", kind="exec", language=OTHER) == 1
    assert total(text, "groundloop_errors_total", code=OTHER) == 1
    assert total(text, "groundloop_sandbox_acquire_seconds_count", source=OTHER) == 1
    for bad in ("rm -rf", "alice", "cobol", "4f2a9c", "somewhere"):
        assert bad not in text
    # Exec without a language is shell.
    assert total(text, "groundloop_execution_seconds_count", kind="exec", language="shell") == 0
    m.execution_done("exec", None, "ok", 0.1)
    assert total(m.exposition(), "groundloop_execution_seconds_count", kind="exec", language="shell") == 1


def test_series_exist_before_any_work():
    text = Metrics().exposition().decode()
    for code in ERROR_CODES:
        assert (("groundloop_errors_total", frozenset({("code", code)}))) in samples(text)
    assert total(text, "groundloop_sandboxes", state="warm") == 0
    assert total(text, "groundloop_build_info") == 1


@pytest.mark.parametrize(
    "done, outcome",
    [
        ({"ok": True}, "ok"),
        ({"ok": True, "exit_code": 0}, "ok"),
        ({"ok": True, "exit_code": 3}, "error"),
        ({"ok": False, "error": {"name": "ZeroDivisionError", "message": ""}}, "error"),
        ({"ok": False, "error": {"name": "Timeout", "message": ""}}, "timeout"),
        ({"ok": False, "error": {"name": "Cancelled", "message": ""}}, "cancelled"),
        ({"ok": False, "error": {"name": "SandboxLost", "message": ""}}, "lost"),
        (None, "lost"),
    ],
)
def test_outcome_of(done, outcome):
    assert outcome_of(done) == outcome


def test_bounded():
    assert bounded("a", ("a", "b")) == "a"
    assert bounded(None, ("a",)) == OTHER
    assert bounded(3, ("a",)) == OTHER


def test_promtool_check_metrics():
    tool = promtool()
    for m in (Metrics(), busy_metrics()):
        proc = subprocess.run([tool, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=60)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
        assert not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout + proc.stderr).decode()


def test_dashboard_queries_only_exported_metrics():
    families = Metrics().families()
    exposed = {name for name, _ in samples(busy_metrics().exposition())}
    used: set[str] = set()
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    for expr in exprs:
        names = NAME_RE.findall(expr)
        assert names, f"a dashboard query reads no groundloop metric: {expr}"
        for name in names:
            family = resolve(name, families)
            assert family is not None, f"the dashboard queries {name}, which the server does not export ({expr})"
            assert name in exposed, f"{name} has no samples in the exposition"
            used.add(family)
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \(le\b", expr), expr
    assert set(families) == used, f"exported but on no panel: {sorted(set(families) - used)}"


def test_dashboard_covers_every_stage():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    for want in ("Latency", "Throughput", "Errors", "pool", "Sessions"):
        assert any(want.lower() in r.lower() for r in rows), (want, rows)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "groundloop"


# ---- with Docker: a real engine with Metrics as its hooks


class WatchedMetrics(Metrics):
    """Metrics that also wakes the test when the engine reports a filled pool (an observer, not a stub)."""

    def __init__(self, pool_size: int):
        super().__init__()
        self.want = pool_size
        self.pool_filled = asyncio.Event()

    def sandboxes_changed(self, counts: dict[str, int]) -> None:
        super().sandboxes_changed(counts)
        if counts.get("warm", 0) >= self.want:
            self.pool_filled.set()


@pytest.mark.docker
async def test_engine_work_moves_the_histograms(collect):
    from groundloop.sandbox.docker_backend import DockerBackend
    from groundloop.sandbox.engine import Engine

    settings = sandbox_settings(pool_size=1)
    metrics = WatchedMetrics(pool_size=1)
    engine = Engine(DockerBackend(settings), settings, hooks=metrics)
    metrics.set_pool_size(engine.pool_size)
    before = metrics.exposition()
    assert total(before, "groundloop_sandbox_start_seconds_count") == 0
    await engine.start()
    try:
        await asyncio.wait_for(metrics.pool_filled.wait(), 120)
        text = metrics.exposition()
        assert total(text, "groundloop_sandbox_start_seconds_count") >= 1
        assert total(text, "groundloop_sandboxes", state="warm") == 1
        assert total(text, "groundloop_sandbox_pool_free") == 1
        assert total(text, "groundloop_sandbox_pool_size") == 1

        sb = await engine.acquire()
        metrics.pool_filled.clear()  # the engine refills behind it
        try:
            text = metrics.exposition()
            assert total(text, "groundloop_sandbox_acquire_seconds_count", source="pool") == 1
            assert total(text, "groundloop_sandboxes", state="in_use") == 1
            # A pool pop is sub-millisecond work: it must land in a bucket under 1 ms.
            assert total(text, "groundloop_sandbox_acquire_seconds_bucket", source="pool", le="0.001") == 1

            out = collect()
            first: list[float] = []
            t0 = time.perf_counter()

            async def on_event(ev):
                if not first:
                    first.append(time.perf_counter() - t0)
                await out(ev)

            done = await sb.request(
                "run_code",
                {
                    "code": "print('hi')\n1/0",
                    "language": "python",
                    "timeout_s": 30,
                    "max_output_bytes": settings.max_output_bytes,
                },
                on_event,
            )
            metrics.execution_done(
                "run_code", "python", outcome_of(done), time.perf_counter() - t0, truncated=bool(done.get("truncated"))
            )
            metrics.first_output_seen("run_code", first[0])
            assert out.text() == "hi\n"

            t0 = time.perf_counter()
            done = await sb.request(
                "exec",
                {"command": "echo one; exit 4", "timeout_s": 30, "max_output_bytes": settings.max_output_bytes},
                collect(),
            )
            metrics.execution_done("exec", None, outcome_of(done), time.perf_counter() - t0)
        finally:
            await engine.release(sb)
        text = metrics.exposition()
        assert (
            total(text, "groundloop_execution_seconds_count", kind="run_code", language="python", outcome="error") == 1
        )
        assert total(text, "groundloop_execution_seconds_count", kind="exec", language="shell", outcome="error") == 1
        assert total(text, "groundloop_execution_seconds_sum") > 0
        assert total(text, "groundloop_first_output_seconds_count", kind="run_code") == 1
        assert total(text, "groundloop_sandboxes", state="in_use") == 0
        # Let the refill finish before closing: a start cancelled mid-way leaks its attach
        # socket (see the report on sandbox/engine.py).
        await asyncio.wait_for(metrics.pool_filled.wait(), 120)
        if shutil.which("promtool"):
            proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
            assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    finally:
        await engine.close()
