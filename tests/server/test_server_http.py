"""HTTP endpoints: health, readiness, metrics, validate-code, the static page."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support.env import server_settings
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = pytest.mark.docker

AUTH = {"Authorization": "Bearer tok1"}
BOB = {"Authorization": "Bearer tok2"}


async def test_health_ready_metrics(server):
    async with httpx.AsyncClient(base_url=server.http) as h:
        assert (await h.get("/healthz")).json() == {"ok": True}
        ready = await h.get("/readyz")
        assert ready.status_code in (200, 503)
        assert ready.json()["engine"]["backend"] == "docker"
        async with await WSClient.connect(server.url, token="tok1") as c:
            assert (await c.call("run_code", code="print(1)"))["ok"]
        text = (await h.get("/metrics")).text
        assert "groundloop_connections" in text and "groundloop_requests_total" in text
        assert 'type="run_code"' in text


async def test_validate_code(server):
    async with httpx.AsyncClient(base_url=server.http, timeout=120) as h:
        assert (await h.post("/v1/validate-code", json={"code": "1"})).status_code == 401
        bad = await h.post("/v1/validate-code", json={"code": "1"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
        assert (await h.post("/v1/validate-code", json={"nocode": 1}, headers=AUTH)).status_code == 400
        # no session of alice: a short-lived sandbox
        r = (await h.post("/v1/validate-code", json={"code": "print('hi')\n6*7"}, headers=AUTH)).json()
        assert r["ok"] is True and r["output"] == "hi\n" and r["cached"] is False
        assert r["results"][-1]["text/plain"] == "42" and "text/plain" in r["formats"]
        again = (await h.post("/v1/validate-code", json={"code": "print('hi')\n6*7"}, headers=AUTH)).json()
        assert again["cached"] is True and again["output"] == "hi\n"
        js = (
            await h.post("/v1/validate-code", json={"code": "console.log(2)", "language": "javascript"}, headers=AUTH)
        ).json()
        assert js["ok"] and js["output"] == "2\n"
        # what a notebook would show at the end: the display updated, what came before a clear gone
        shown = (
            await h.post(
                "/v1/validate-code",
                json={
                    "code": "from IPython.display import display, update_display, clear_output\n"
                    "print('gone')\nclear_output()\nprint('kept')\n"
                    "display('a', display_id='p')\nupdate_display('b', display_id='p')"
                },
                headers=AUTH,
            )
        ).json()
        assert shown["ok"] and shown["output"] == "kept\n", shown
        assert [r["text/plain"] for r in shown["results"]] == ["'b'"], shown


async def test_validate_code_never_sees_a_users_state(server):
    """Issue 21, item 1: the cache is shared, so the run must not depend on anyone's session. Alice's files and
    variables are invisible to validate-code (hers and bob's), and her workspace cannot shadow a module."""
    async with httpx.AsyncClient(base_url=server.http, timeout=120) as h:
        async with await WSClient.connect(server.url, token="tok1") as alice:
            assert (await alice.call("write_file", path="secret.txt", content="alice-secret"))["ok"]
            assert (await alice.call("write_file", path="statistics.py", content="def mean(x):\n    return 666\n"))[
                "ok"
            ]
            assert (await alice.call("run_code", code="secret = 1"))["ok"]
            read = "import os\nprint(os.path.exists('/workspace/secret.txt'))"
            mine = (await h.post("/v1/validate-code", json={"code": read}, headers=AUTH)).json()
            assert mine["ok"] and mine["output"] == "False\n" and mine["cached"] is False
            theirs = (await h.post("/v1/validate-code", json={"code": read}, headers=BOB)).json()
            assert theirs["output"] == "False\n"
            poisoned = "import statistics\nprint(statistics.mean([1, 2, 3]))"
            for who in (AUTH, BOB):
                r = (await h.post("/v1/validate-code", json={"code": poisoned}, headers=who)).json()
                assert r["ok"] and r["output"] == "2\n", r
            name = (await h.post("/v1/validate-code", json={"code": "secret"}, headers=AUTH)).json()
            assert name["ok"] is False and name["error"]["name"] == "NameError"
            # alice's session is untouched: no context was added to it, her state is still there
            contexts = (await alice.call("list_contexts"))["contexts"]
            # (the default contexts of the other languages are listed too, never started)
            assert [ctx["context_id"] for ctx in contexts if ctx["alive"]] == ["default-python"]
            assert WSClient.text(await alice.request("run_code", code="print(secret)")) == "1\n"


async def test_validate_code_limits():
    """Issue 21, item 2: validate-code is held to the user's limits and cannot drain the pool, and a huge body
    is refused before it is read whole."""
    settings = server_settings(
        validate_concurrency=4, max_sessions_per_user=3, max_message_bytes=1 << 20, rate_per_s=0.001, rate_burst=6
    )
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.http, timeout=120) as h:
        sleep = {"code": "import time\ntime.sleep(3)\nprint('slept')"}
        runs = [
            asyncio.create_task(h.post("/v1/validate-code", json={**sleep, "n": i}, headers=AUTH)) for i in range(4)
        ]
        # alice may hold half the server's runs, no more: bob still gets his (review finding)
        bobs = asyncio.create_task(h.post("/v1/validate-code", json={**sleep, "n": "bob"}, headers=BOB))
        runs.append(bobs)
        peak = 0
        while not all(r.done() for r in runs):  # the most sandboxes held at once while the runs go on
            peak = max(peak, srv.state.engine.counts()["in_use"])
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(*runs[:4])
        assert bobs.result().status_code == 200 and bobs.result().json()["output"] == "slept\n"
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429, 429], codes
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"busy"}
        assert [a.json()["output"] for a in answers if a.status_code == 200] == ["slept\n"] * 2
        assert 1 <= peak <= 3  # alice's two and bob's one at most: the pool everyone draws from was not drained
        # the burst of 6 is spent (4 above, 2 below): the next one is rate limited
        assert (await h.post("/v1/validate-code", json={"code": "1"}, headers=AUTH)).status_code == 200
        assert (await h.post("/v1/validate-code", json={"code": "2"}, headers=AUTH)).status_code == 200
        limited = await h.post("/v1/validate-code", json={"code": "3"}, headers=AUTH)
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        # a body over the limit (bob: alice's bucket is empty, and the limits come before the body is read):
        # 413 from the declared length, and from the stream when none is declared
        big = b'{"code": "' + b"x" * (2 << 20) + b'"}'
        assert (await h.post("/v1/validate-code", content=big, headers=BOB)).status_code == 413

        async def chunks():
            for _ in range(64):
                yield b"x" * (64 << 10)

        streamed = await h.post("/v1/validate-code", content=chunks(), headers=BOB)
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"


async def test_static_page(tmp_path):
    (tmp_path / "index.html").write_text("<h1>groundloop</h1>")
    async with run_server(server_settings(static_dir=str(tmp_path))) as srv:
        async with httpx.AsyncClient(base_url=srv.http) as h:
            page = await h.get("/")
            assert page.status_code == 200 and "groundloop" in page.text


async def test_metrics_on_their_own_port():
    """GROUNDLOOP_METRICS_PORT: /metrics moves to a port the public proxy never routes to."""
    from support.system import free_port

    port = free_port()
    async with run_server(server_settings(metrics_port=port)) as srv, httpx.AsyncClient(timeout=30) as h:
        main = await h.get(srv.http + "/metrics")
        assert main.status_code == 404
        own = await h.get(f"http://127.0.0.1:{port}/metrics")
        assert own.status_code == 200 and "groundloop_connections" in own.text
    with pytest.raises(httpx.ConnectError):  # the listener went with the server
        async with httpx.AsyncClient(timeout=5) as h:
            await h.get(f"http://127.0.0.1:{port}/metrics")


async def test_readiness_is_taking_sessions_not_a_full_pool():
    """Issue 20: a pool that is short (here: never filled) leaves the server ready; pool_full says it."""
    from support.env import sandbox_settings

    async with run_server(server_settings(sandbox=sandbox_settings(pool_size=0))) as srv:
        srv.state.engine.pool_size = 5  # a pool of 5 that never fills (no refill runs for it)
        async with httpx.AsyncClient(base_url=srv.http) as h:
            r = await h.get("/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True and r.json()["pool_full"] is False, r.text
            srv.state.manager.draining = True
            r = await h.get("/readyz")
            assert r.status_code == 404 and r.json()["draining"] is True
            srv.state.manager.draining = False


async def test_not_ready_while_sandboxes_cannot_start():
    """A server whose sandboxes cannot start (the image is missing on its node) takes no new session:
    /readyz 503 with the reason, so the proxy sends sessions elsewhere."""
    from support.env import sandbox_settings

    sb = sandbox_settings(image="groundloop-sandbox:no-such-image", pool_size=1)
    async with run_server(server_settings(sandbox=sb)) as srv, httpx.AsyncClient(base_url=srv.http) as h:
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the pool's first start fails in the background: no event to await from here
            r = await h.get("/readyz")
            if r.status_code == 503 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 503 and "sandboxes fail to start" in r.json()["reason"], r.text


def test_anonymous_mode_refuses_a_separate_metrics_port():
    """Review finding: in anonymous mode every route answers loopback host names only (issue 21, item 3), but
    the separate metrics listener (prometheus_client's) cannot check the Host header, so it is refused."""
    from groundloop.server.app import create_app
    from groundloop.server.settings import SettingsError

    with pytest.raises(SettingsError, match="GROUNDLOOP_METRICS_PORT needs tokens"):
        create_app(server_settings(tokens=[], metrics_port=9999))
    create_app(server_settings(metrics_port=9999))  # with tokens it is allowed (nothing starts here)
