"""HTTP endpoints: health, readiness, metrics, validate-code, the static page."""

from __future__ import annotations

import httpx
import pytest
from conftest import run_server, server_settings
from wsclient import WSClient

pytestmark = pytest.mark.docker

AUTH = {"Authorization": "Bearer tok1"}


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
        # with a session: runs in a fresh context of that sandbox, leaving the default context alone
        async with await WSClient.connect(server.url, token="tok1") as c:
            assert (await c.call("run_code", code="secret = 1"))["ok"]
            r = (await h.post("/v1/validate-code", json={"code": "secret"}, headers=AUTH)).json()
            assert r["ok"] is False and r["error"]["name"] == "NameError"
            contexts = (await c.call("list_contexts"))["contexts"]
            assert [ctx["context_id"] for ctx in contexts] == ["default-python"]
            js = (await h.post("/v1/validate-code", json={"code": "console.log(2)", "language": "javascript"},
                               headers=AUTH)).json()
            assert js["ok"] and js["output"] == "2\n"


async def test_static_page(tmp_path):
    (tmp_path / "index.html").write_text("<h1>groundloop</h1>")
    async with run_server(server_settings(static_dir=str(tmp_path))) as srv:
        async with httpx.AsyncClient(base_url=srv.http) as h:
            page = await h.get("/")
            assert page.status_code == 200 and "groundloop" in page.text
