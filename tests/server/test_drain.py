"""The drain (server/drain.py) in-process: its frame, literal; detached sessions with frames their client
was not sent (fake backend); and a request past the deadline (Docker)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest
import websockets
from groundloop.server import drain as drain_mod
from groundloop.server.drain import drain, draining_frame
from support.servers import run_server
from support.units import HANG_GUARD_S, FakeConn, Reader, harness
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


async def _detached_with_an_unsent_done(h):
    """A session whose request ended while its client was reconnecting: its last frames are unsent."""
    conn = FakeConn()
    s, rd = await h.session(conn=conn)
    await rd.next()  # ready
    await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "print:3"}))
    while s.requests:
        await asyncio.sleep(0)
    s.detach(conn)
    assert s.outbox.unsent == 3 + 1
    return s


async def test_a_detached_session_keeps_its_unsent_done_for_the_resume(monkeypatch):
    """The drain does not close a detached session whose done its client was not sent: the client that
    resumes gets its output, its done and the draining frame, then the close (1012)."""
    monkeypatch.setattr(drain_mod, "POLL_S", 0)  # every turn of the loop is a poll of the drain
    async with harness() as h:
        s = await _detached_with_an_unsent_done(h)
        gone = FakeConn()  # a detached session whose client got everything: closed at once
        idle, rd_idle = await h.session(conn=gone)
        await rd_idle.next()
        idle.detach(gone)
        drained = asyncio.create_task(drain(SimpleNamespace(manager=h.manager), 60.0))
        await asyncio.wait_for(idle.closed.wait(), HANG_GUARD_S)  # its draining frame alone does not keep it
        for _ in range(50):  # fifty polls of the drain
            await asyncio.sleep(0)
        assert s.live and not drained.done()
        conn = FakeConn()
        await s.attach(conn, 1)
        rd = Reader(s)
        assert (await rd.done(1))["ok"] is True
        assert [f["text"] for f in rd.frames if f["type"] == "stdout"] == ["0\n", "1\n", "2\n"]
        assert (await rd.until(lambda f: f["type"] == "draining"))["deadline_s"] > 0
        assert await asyncio.wait_for(drained, HANG_GUARD_S) == 2
        assert conn.closed == (1012, "drained") and not h.manager.sessions


@pytest.mark.parametrize("why", ["deadline", "grace"])
async def test_unsent_frames_of_a_detached_session_wait_no_longer_than_the_deadline_or_grace(monkeypatch, why):
    monkeypatch.setattr(drain_mod, "POLL_S", 0)
    async with harness() as h:
        s = await _detached_with_an_unsent_done(h)
        if why == "grace":
            s.detached_at -= h.manager.settings.resume_grace_s  # its client had its chance
        drained = asyncio.create_task(drain(SimpleNamespace(manager=h.manager), 0.0 if why == "deadline" else 60.0))
        assert await asyncio.wait_for(drained, HANG_GUARD_S) == 1
        assert not s.live


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
