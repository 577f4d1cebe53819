"""GET /metrics of a real server after real work: the histograms moved, promtool agrees,
and every metric the Grafana dashboard queries is in the scraped exposition."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from support.metrics import NAME_RE, dashboard_queries, resolve, samples, total
from support.wsclient import WSClient

pytestmark = pytest.mark.docker


async def scrape(server) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(server.http + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def do_work(c: WSClient) -> None:
    """A little of everything a session does: code with output, an error, exec, files, a bad frame."""
    frames = await c.request("run_code", code="for i in range(3): print(i)")
    assert frames[-1]["ok"] is True
    frames = await c.request("run_code", code="1/0")
    assert frames[-1]["ok"] is False
    frames = await c.request("exec", command="echo hi; exit 3")
    assert frames[-1]["exit_code"] == 3
    frames = await c.request("write_file", path="a.txt", content="x")
    assert frames[-1]["ok"] is True
    await c.send_raw("this is not json")
    while (await c.recv())["type"] != "error":
        pass


async def test_scrape_after_real_work(server):
    before = await scrape(server)
    async with await WSClient.connect(server.url, token="tok1") as c:
        await do_work(c)
        text = await scrape(server)
    # Histograms moved.
    assert total(text, "groundloop_execution_seconds_count", kind="run_code", language="python", outcome="ok") == 1
    assert total(text, "groundloop_execution_seconds_count", kind="run_code", outcome="error") == 1
    assert total(text, "groundloop_execution_seconds_count", kind="exec", language="shell") == 1
    assert total(text, "groundloop_execution_seconds_sum") > 0
    assert total(text, "groundloop_first_output_seconds_count", kind="run_code") >= 1
    assert total(text, "groundloop_first_output_seconds_count", kind="exec") == 1
    assert total(text, "groundloop_request_duration_seconds_count", type="write_file") == 1
    assert total(text, "groundloop_sandbox_acquire_seconds_count") >= 1
    assert total(text, "groundloop_sandbox_start_seconds_count") >= 1
    assert total(text, "groundloop_ws_send_queue_wait_seconds_count") > total(
        before, "groundloop_ws_send_queue_wait_seconds_count"
    )
    # Counters and gauges.
    assert total(text, "groundloop_requests_total", type="run_code") == 2
    assert total(text, "groundloop_requests_total", type="exec") == 1
    assert total(text, "groundloop_errors_total", code="bad_request") >= 1
    assert total(text, "groundloop_ws_frames_sent_total") > 0
    assert total(text, "groundloop_ws_sent_bytes_total") > total(text, "groundloop_ws_frames_sent_total")
    assert total(text, "groundloop_connections") == 1
    assert total(text, "groundloop_sessions") == 1
    assert total(text, "groundloop_sandbox_pool_size") == server.settings.sandbox.pool_size
    assert total(text, "groundloop_sandboxes", state="in_use") == 1
    # No session id, user or code in any label.
    for (_, labels), _value in samples(text).items():
        for _, value in labels:
            assert c.session_id not in value and "alice" not in value and "range(" not in value


async def test_scraped_exposition_passes_promtool_and_serves_the_dashboard(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        await do_work(c)
        text = await scrape(server)
    if shutil.which("promtool"):
        proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    families = server.state.metrics.families()
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    for expr in dashboard_queries():
        for name in NAME_RE.findall(expr):
            family = resolve(name, families)
            assert family is not None, f"the dashboard queries {name}, which the server does not export"
            base = family.removesuffix("_total") if families[family] == "counter" else family
            assert base in declared or family in declared, f"{name} is not in the server's /metrics"
