"""Issue 21, round two, server side: DNS rebinding, memory by bytes, a bad resume, validate-code and
detached sessions. Each test reproduced its finding first (it failed on the code before the fix).
The handshake limits (item 11) are in test_handshake.py."""

from __future__ import annotations

import asyncio
import gc
import socket

import httpx
import orjson
import pytest
from support.env import server_settings
from support.raw_http import upgrade_head
from support.servers import run_server
from support.system import rss
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.docker

AUTH = {"Authorization": "Bearer tok1"}


def _upgrade(port: int, host: str, origin: str | None = None) -> bytes:
    """The status line of a WebSocket upgrade on a raw socket, with any Host and Origin."""
    head = upgrade_head(host, *([f"Origin: {origin}"] if origin is not None else []))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


async def test_anonymous_mode_answers_loopback_host_names_only():
    """Item 3: a page on evil.example rebound to 127.0.0.1 sends Host and Origin evil.example:PORT. It got 101
    and a session, and 200 from validate-code; now 403, while loopback names still work."""
    async with run_server(server_settings(tokens=[])) as srv:
        port = srv.port
        evil = f"evil.example:{port}"
        upgrade = lambda host, origin=None: asyncio.to_thread(_upgrade, port, host, origin)  # noqa: E731
        assert b" 403 " in await upgrade(evil, f"http://{evil}")
        assert b" 403 " in await upgrade(evil)
        assert b" 403 " in await upgrade(f"127.0.0.1:{port}", f"http://{evil}")
        for name in ("127.0.0.1", "localhost", "[::1]"):
            assert b" 101 " in await upgrade(f"{name}:{port}", f"http://{name}:{port}"), name
        assert not srv.state.manager.sessions or all(s.user == "local" for s in srv.state.manager.sessions.values())
        async with httpx.AsyncClient(base_url=srv.http, timeout=120) as h:
            body = {"code": "print('rebound')"}
            r = await h.post("/v1/validate-code", json=body, headers={"Host": evil, "Origin": f"http://{evil}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            assert (await h.post("/v1/validate-code", json=body, headers={"Host": evil})).status_code == 403
            for path in ("/", "/metrics", "/readyz"):
                assert (await h.get(path, headers={"Host": evil})).status_code == 403, path
            ok = await h.post("/v1/validate-code", json=body, headers={"Origin": f"http://127.0.0.1:{port}"})
            assert ok.status_code == 200 and ok.json()["output"] == "rebound\n"


async def closed_code(c: WSClient) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await c.recv()
    return info.value.rcvd.code if info.value.rcvd else 1006


async def test_a_bad_resume_leaves_the_session_untouched():
    """Item 9: a resume with a too-high last_seq closed the live socket (4409) before it failed, and the
    session, attached to nothing, then outlived its grace (only the idle timeout reaped it). Now it is
    refused first: the open socket goes on, and once it closes the session is reaped at its grace."""
    async with run_server(server_settings(resume_grace_s=0.5)) as srv:
        c = await WSClient.connect(srv.url, token="tok1")
        session = srv.state.manager.sessions[c.session_id]
        bad = await WSClient.connect(srv.url, token="tok1", session=c.session_id, last_seq=10**6, expect_ready=False)
        frame = orjson.loads(await bad.ws.recv())
        assert frame["code"] == "bad_request" and frame["seq"] == 0
        assert await closed_code(bad) == 4400
        assert (await c.call("ping"))["ok"]
        assert session.conn is not None and session.detached_at is None
        await c.ws.close()
        await asyncio.wait_for(session.closed.wait(), 60)
        assert c.session_id not in srv.state.manager.sessions


async def _until(predicate, timeout: float = 120.0) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_client_that_never_reads_cannot_grow_the_server_by_its_frames():
    """Item 4: six 16 MiB frames of an unknown `type`, from a client that reads nothing, grew the server by
    ~285 MiB: the type came back whole in the error and in the done, and the outbox counted frames, not
    bytes. Now echoed values are cut, and the outbox has a byte budget too."""
    async with run_server() as srv:
        c = await WSClient.connect(srv.url, token="tok1")
        session = srv.state.manager.sessions[c.session_id]
        big = "x" * (16 << 20)
        frames = [orjson.dumps({"id": f"big{i}", "type": big}) for i in range(6)]
        gc.collect()
        before = rss()
        for frame in frames:
            await c.ws.send(frame)
        # every frame answered (an error and a done each, after ready), none of them read by the client
        await _until(lambda: session.outbox.next_seq - 1 >= 1 + 2 * len(frames))
        growth = rss() - before
        print(f"RSS growth {growth / 2**20:.1f} MiB")
        assert growth < 64 << 20, f"the server grew by {growth / 2**20:.0f} MiB"
        assert session.outbox.buffered_bytes < 64 << 10
        await c.ws.close()


async def test_validate_code_neither_uses_nor_keeps_alive_a_detached_session():
    """Item 10: validate-code could run inside a detached session, and did not count as its activity. Since
    item 1 it never uses a session; this holds it for a detached one: the session's sandbox sees nothing of
    the runs, its grace and idle clocks do not move, and it is reaped at its grace as usual."""
    grace = 600.0  # reaping is driven by hand below, at the grace's exact end
    async with run_server(server_settings(resume_grace_s=grace)) as srv:
        manager = srv.state.manager
        c = await WSClient.connect(srv.url, token="tok1")
        assert (await c.call("write_file", path="secret.txt", content="alice-secret"))["ok"]
        assert (await c.call("run_code", code="secret = 1"))["ok"]
        session = manager.sessions[c.session_id]
        await c.ws.close()
        await _until(lambda: session.detached_at is not None)
        detached_at, activity = session.detached_at, session.last_activity
        async with httpx.AsyncClient(base_url=srv.http, timeout=120) as h:
            for i in range(3):
                code = (
                    f"import os\nprint(os.path.exists('/workspace/secret.txt'), {i})\n"
                    f"open('/workspace/from-validate-{i}.txt', 'w').write('x')\nleaked = {i}"
                )
                r = (await h.post("/v1/validate-code", json={"code": code}, headers=AUTH)).json()
                assert r["ok"] and r["output"] == f"False {i}\n", r
        assert session.detached_at == detached_at and session.last_activity == activity
        assert session.live and session.conn is None and not session.inflight
        sb = session.sb
        listed = await sb.request("list_files", {"path": "."}, deadline_s=60)
        names = {f["name"] for f in listed["entries"]}
        assert "secret.txt" in names and not any(n.startswith("from-validate") for n in names), names
        contexts = await sb.request("list_contexts", {}, deadline_s=60)
        assert [ctx["context_id"] for ctx in contexts["contexts"] if ctx["alive"]] == ["default-python"]
        assert await manager.reap(detached_at + grace - 1) == 0
        assert await manager.reap(detached_at + grace + 0.001) == 1
        assert not session.live and c.session_id not in manager.sessions
