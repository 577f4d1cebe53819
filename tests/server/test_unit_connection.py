"""The connection and uvicorn's fast paths without Docker: a real uvicorn (websockets-sansio) on loopback,
real WebSocket clients, the fake sandbox backend.

The fast-path tests fail when server/uvicorn_adapter.py silently falls back to plain ASGI: after an
upgrade of uvicorn that renames what it reaches into, the server would still work, only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import orjson
import pytest
import uvicorn
import websockets
from groundloop.server import uvicorn_adapter
from groundloop.server.app import transport_max_size
from support.units import fake_server, settings
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed


def url(uv) -> str:
    return f"ws://127.0.0.1:{uv.groundloop_port}/v1/ws"


def session_of(uv, c: WSClient):
    return uv.app.state.groundloop.manager.sessions[c.session_id]


async def test_requests_over_a_socket_use_the_fast_paths():
    async with fake_server() as uv, await WSClient.connect(url(uv), token="tok1") as c:
        frames = await c.request("run_code", code="print:300")
        assert WSClient.text(frames) == "".join(f"{i}\n" for i in range(300)) and frames[-1]["ok"]
        conn = session_of(uv, c).conn
        assert conn.batch is not None, "the batched writer fell back to one ASGI send per frame"
        scope = conn.ws.scope
        transport = uvicorn_adapter.transport_of(scope)
        assert transport is not None, "the transport of uvicorn's connection could not be reached"
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@contextlib.asynccontextmanager
async def raw_uvicorn(ws_impl: str, seen: dict):
    """A bare ASGI app under uvicorn that records what uvicorn_adapter makes of its connection."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        seen["batch"] = uvicorn_adapter.batch_writer(scope[uvicorn_adapter.RAW_SEND])
        seen["transport"] = uvicorn_adapter.transport_of(scope)
        seen["nodelay"] = uvicorn_adapter.set_nodelay(scope)
        if seen["batch"] is not None:

            class F:
                def __init__(self, seq, rest):
                    self.seq, self.rest = seq, rest

                def wire(self):
                    return b'{"seq":%d,' % self.seq + self.rest

            await seen["batch"]([F(1, b'"a":1}'), F(2, b'"b":"' + b"x" * 70000 + b'"}')])
        else:
            await send({"type": "websocket.send", "text": '{"seq":1,"a":1}'})
        await send({"type": "websocket.close", "code": 1000})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        uvicorn_adapter.RawSendStash(app), ws=ws_impl, log_config=None, lifespan="on", ws_per_message_deflate=False
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_websockets_sansio_gets_every_fast_path():
    seen: dict = {}
    async with raw_uvicorn("websockets-sansio", seen) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None) as ws:
            first = orjson.loads(await ws.recv())
            second = orjson.loads(await ws.recv())
    assert seen["batch"] is not None and seen["transport"] is not None and seen["nodelay"] is True
    assert first == {"seq": 1, "a": 1} and second["seq"] == 2 and len(second["b"]) == 70000


async def test_the_check_tells_the_fast_path_from_the_fallback():
    """batch_writer says None when uvicorn's objects lack anything it uses (so the test above can fail)."""
    seen: dict = {}
    async with raw_uvicorn("websockets-sansio", seen) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None) as ws:
            await ws.recv()
    proto = seen["transport"]  # any object: what matters is which attributes the send's owner has

    class Proto:
        def __init__(self, drop: str | None):
            self.writable, self.close_sent, self.transport = asyncio.Event(), False, proto
            self.conn = type("Conn", (), {"send_text": 1, "data_to_send": 1, "state": 1, "extensions": []})()
            if drop in ("writable", "close_sent", "transport"):
                delattr(self, drop)
            elif drop is not None:
                delattr(type(self.conn), drop)

        async def send(self, message):
            pass

    assert uvicorn_adapter.batch_writer(Proto(None).send) is not None
    for drop in ("writable", "close_sent", "transport", "send_text", "data_to_send", "state", "extensions"):
        assert uvicorn_adapter.batch_writer(Proto(drop).send) is None, drop
    assert uvicorn_adapter.batch_writer(print) is None
    assert uvicorn_adapter.transport_of({}) is None and uvicorn_adapter.abort({}) is False


async def test_resume_over_sockets_with_a_gap_and_takeover():
    async with fake_server(replay_frames=8) as uv:
        c = await WSClient.connect(url(uv), token="tok1")
        frames = await c.request("run_code", code="print:40")
        assert frames[-1]["ok"]
        sid, last = c.session_id, c.last_seq
        async with await WSClient.connect(url(uv), token="tok1", session=sid, last_seq=3) as c2:
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await c.recv()
            assert info.value.rcvd.code == 4409  # taken over
            gap = await c2.recv()
            assert gap["type"] == "gap" and gap["missed"] == last - 3 - 8
            kept = [await c2.recv() for _ in range(8)]
            assert kept[-1]["type"] == "done" and [f["text"] for f in kept[:-1]] == [f"{i}\n" for i in range(33, 40)]
            assert (await c2.call("ping"))["ok"]
        # another user cannot resume it; a resume past what was sent is refused
        other = await WSClient.connect(url(uv), token="tok2", session=sid, last_seq=0, expect_ready=False)
        err = orjson.loads(await other.ws.recv())
        assert err == {"seq": 0, "type": "error", "code": "not_found", "message": err["message"]}
        bad = await WSClient.connect(url(uv), token="tok1", session=sid, last_seq=10_000, expect_ready=False)
        assert orjson.loads(await bad.ws.recv())["code"] == "bad_request"
        with pytest.raises(ConnectionClosed):
            await bad.ws.recv()
        assert bad.ws.close_code == 4400


async def test_refusals_before_the_upgrade_and_frame_limits():
    async with fake_server(max_message_bytes=1024) as uv:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            await WSClient.connect(url(uv), token="wrong")
        assert info.value.response.status_code == 401
        async with await WSClient.connect(url(uv), token="tok1") as c:
            await c.send_raw(orjson.dumps({"type": "ping", "id": "big", "pad": "x" * 2000}))
            err = await c.recv()
            assert err["code"] == "too_large" and "id" not in err  # refused unread: no id, no done
            assert (await c.call("ping"))["ok"]  # the connection stays
            assert not c.of("big")
            # over the transport's own limit: closed 1009
            await c.send_raw("x" * (transport_max_size(settings(max_message_bytes=1024)) + 1))
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.recv()
            assert c.ws.close_code == 1009
