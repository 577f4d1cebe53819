"""The drain (server/drain.py) in-process: its frame, literal; and a request past the deadline."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import websockets
from groundloop.server.drain import drain, draining_frame
from support.servers import run_server
from support.wsclient import WSClient


def test_draining_frame_literal():
    frame = draining_frame(29.99951)
    assert orjson.loads(orjson.dumps(frame)) == {
        "type": "draining",
        "deadline_s": 30.0,
        "message": frame["message"],
    }
    assert "1012" in frame["message"] and "without `session`" in frame["message"]
    assert draining_frame(-1.0)["deadline_s"] == 0.0


@pytest.mark.docker
async def test_a_request_past_the_deadline_is_cancelled_with_its_done():
    """Every request ends with one done, even one the drain cuts: Cancelled, then the close (1012)."""
    async with run_server() as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            rid = await c.send("run_code", code="import time\nprint('start', flush=True)\ntime.sleep(60)")
            while not c.of(rid, "stdout"):
                await c.recv()
            drained = asyncio.create_task(drain(srv.state, 0.5))
            frames = await c.until_done(rid)
            assert any(f["type"] == "draining" for f in c.frames)
            assert frames[-1]["ok"] is False and frames[-1]["error"]["name"] == "Cancelled", frames[-1]
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await c.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1012
            assert await drained == 1
            assert not srv.state.manager.sessions
