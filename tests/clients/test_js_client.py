"""The TypeScript client (clients/js/): its node tests against a real server, and its vendored build.

``node --test`` runs clients/js/test/ against a real uvicorn with real Docker started here, the URL in
``GROUNDLOOP_TEST_URL``; ``assist`` talks to the scripted local fake of the Messages API. The page serves
static/vendor/groundloop-client.js, the client's build committed so that ``make run`` needs no build step:
a fresh build must be identical to it, so the two cannot drift.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import anthropic
import pytest
from groundloop.server.metrics import Metrics
from groundloop.sessions.assist import AssistRunner
from support.env import server_settings
from support.fake_anthropic import text
from support.servers import run_server

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "clients" / "js"
VENDORED = ROOT / "static" / "vendor" / "groundloop-client.js"
TSC = JS / "node_modules" / ".bin" / "tsc"
NODE = shutil.which("node")


def _missing() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not TSC.exists():
        return "clients/js/node_modules is missing (make js, or npm ci in clients/js)"
    return None


# CI sets GROUNDLOOP_REQUIRE_NODE=1: there a missing node fails these tests instead of skipping them.
REQUIRE_NODE = os.environ.get("GROUNDLOOP_REQUIRE_NODE") == "1"
pytestmark = pytest.mark.skipif(_missing() is not None and not REQUIRE_NODE, reason=_missing() or "")


async def _run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 240) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=JS,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


async def _build(out_dir: Path) -> Path:
    rc, out = await _run(str(TSC), "-p", "tsconfig.json", "--outDir", str(out_dir))
    assert rc == 0, out
    return out_dir / "index.js"


async def test_vendored_client_is_a_fresh_build(tmp_path):
    assert _missing() is None, _missing()
    built = await _build(tmp_path)
    assert VENDORED.read_text() == built.read_text(), (
        "static/vendor/groundloop-client.js differs from a build of clients/js/src: run `npm run vendor` in clients/js"
    )
    # One self-contained ES module: the page loads it with no import map and no bundler.
    assert not re.search(r"^\s*(import|export \* from)\b.*from\s", built.read_text(), re.M)


@pytest.mark.docker
async def test_node_client_against_a_real_server(tmp_path, fake):
    # The assist test's model: a failing try, then a working one.
    fake.add(
        text("Let me check.\n", "```python\n", "values = [3, 4]\n", "print('mean', sum(values) / 0)\n", "```\n"),
        text(
            "Oops, a division by zero. Fixed:\n```python\nvalues = [3, 4]\n",
            "print('mean', sum(values) / len(values))\n```\n",
            "The mean is **3.5**.",
        ),
    )
    assert _missing() is None, _missing()
    await _build(JS / "dist")
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
    settings = server_settings(model="claude-test")
    metrics = Metrics()
    try:
        async with run_server(settings, metrics=metrics, assist=AssistRunner(settings, metrics, client=client)) as srv:
            rc, out = await _run(NODE, "--test", "--test-reporter=tap", "test/", env={"GROUNDLOOP_TEST_URL": srv.url})
    finally:
        await client.close()
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", out, re.M)}
    assert rc == 0 and counts.get("fail") == 0, out
    assert counts.get("skipped") == 0 and counts.get("cancelled") == 0, out
    assert counts.get("pass", 0) >= 20, out
