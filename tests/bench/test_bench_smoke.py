"""CI runs the benchmarks in smoke mode only: they must work, and print their table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_prints_the_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "bench", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for row in (
        "engine: run_code 1 + 1 round trip",
        "docker exec python3",
        "engine: pool acquire",
        "engine: cold container start",
        "engine: time to first streamed line",
        "local Jupyter kernel",
        "floor: echo through a container's attach stream",
        "floor: WebSocket echo",
        "ws: run_code 1 + 1 round trip (warm, lean client)",
        "ws: run_code 1 + 1 round trip (warm, asyncio client)",
        "ws: ping round trip (lean client)",
        "ws: connect to ready",
        "ws: time to first stdout line",
        "ws: stream throughput",
        "ws: terminal keystroke to echo [runc]",
        "sessions held at once",
        "concurrent sessions: CPU per request, every process",
        "floor [runc]: echo through a Unix socket",
        "engine [runc, attach]: run_code 1 + 1 round trip",  # and [runc, socket] with an image of this agent
        "ws [runc, attach]: run_code 1 + 1 round trip",
        "ws [runc]: session start from an empty pool",
        "hostile[runc]: bystander during",
        "files[runc]: watch latency, write to file_event",
        "files[runc]: 2 MiB upload / download, 1 MiB chunks",
        "ws: fresh python context + first run",
        "ws: fresh javascript context + first run (paced",
        "ws: run_code fresh, python (1 + 1)",
        "ws: run_code fresh, javascript (paced",
        "humaneval: groundloop, create/run/delete context each, 4 session(s)",
        "humaneval: groundloop, run_code fresh each, 4 session(s)",
        "humaneval: docker exec python3, one warm container",
        "humaneval: one local python3 per problem",
        "egress[runc]: small GET through the proxy",
        "egress[runsc]: small GET through the proxy",
        "MB download through the proxy",
    ):
        assert any(row in line for line in table), f"no row {row!r} in:\n" + "\n".join(table)
    assert not any("FAILED" in line for line in table if "humaneval" in line), "\n".join(table)
    assert not any("errors" in line and " 0 errors" not in line for line in table if "held at once" in line)
