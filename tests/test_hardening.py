"""Issue 21, round two, server side: DNS rebinding, memory by bytes, a bad resume, validate-code and
detached sessions. Each test reproduced its finding first (it failed on the code before the fix).
The handshake limits (item 11) are in test_handshake.py."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import httpx
import orjson
import pytest
from conftest import rss, run_server, server_settings
from wsclient import WSClient

pytestmark = pytest.mark.docker

AUTH = {"Authorization": "Bearer tok1"}


def _upgrade(port: int, host: str, origin: str | None = None) -> bytes:
    """The status line of a WebSocket upgrade on a raw socket, with any Host and Origin."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /v1/ws HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {key}",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
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
