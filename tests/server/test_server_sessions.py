"""Sessions over real sockets: resume, takeover, gaps, slow consumers, reaping, shutdown, scale."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from support.env import NAMESPACE, server_settings
from support.programs import GATED
from support.servers import run_server
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.docker


async def closed_code(c: WSClient) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await c.recv()
    return info.value.rcvd.code if info.value.rcvd else 1006


async def test_resume_mid_stream_loses_and_duplicates_nothing(server):
    c = await WSClient.connect(server.url, token="tok1")
    rid = await c.send("run_code", id="stream", code=GATED)
    while len(c.of(rid, "stdout")) < 60:
        await c.recv()
    got = [f["text"] for f in c.of(rid, "stdout")]
    last = c.last_seq
    await c.ws.close()
    session = server.state.manager.sessions[c.session_id]
    # seq 1..last reached the client; the rest of the first 100 lines wait in the outbox
    async with await WSClient.connect(server.url, token="tok1", session=c.session_id, last_seq=last) as c2:
        assert c2.ready["resumed"] is True and c2.ready["seq"] == last + 1
        assert c2.ready["session_id"] == c.session_id
        c2.last_seq = c2.ready["seq"]
        assert (await c2.call("write_file", path="go", content=""))["ok"]
        frames = await c2.until_done(rid)
        assert frames[-1]["ok"] is True
        got += [f["text"] for f in frames if f["type"] == "stdout"]
        assert got == [f"{i}\n" for i in range(300)]
        assert not any(f["type"] == "gap" for f in c2.frames)
        seqs = [f["seq"] for f in c2.frames]
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    assert session.id in server.state.manager.sessions


async def test_resume_takes_over_an_open_socket(server):
    c1 = await WSClient.connect(server.url, token="tok1")
    assert (await c1.call("run_code", code="z = 3"))["ok"]
    async with await WSClient.connect(server.url, token="tok1", session=c1.session_id, last_seq=c1.last_seq) as c2:
        assert await closed_code(c1) == 4409
        done = await c2.call("run_code", code="z")
        assert done["ok"]  # same sandbox, same context
        assert [f for f in c2.frames if f["type"] == "result"][-1]["data"]["text/plain"] == "3"


async def test_evicted_frames_give_a_gap():
    async with run_server(server_settings(replay_frames=16)) as srv:
        c = await WSClient.connect(srv.url, token="tok1")
        frames = await c.request("exec", command="seq 1 100")
        assert frames[-1]["ok"]
        sid, last = c.session_id, c.last_seq
        await c.ws.close()
        async with await WSClient.connect(srv.url, token="tok1", session=sid, last_seq=1) as c2:
            gap = await c2.recv()
            kept = [await c2.recv() for _ in range(16)]
            assert gap["type"] == "gap" and gap["missed"] == last - 1 - 16
            assert kept[-1]["type"] == "done" and [f["text"] for f in kept[:-1]] == [f"{i}\n" for i in range(86, 101)]
            assert (await c2.call("ping"))["ok"]


async def test_bad_resume(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        bad = await WSClient.connect(server.url, token="tok1", session=c.session_id, last_seq=10**6, expect_ready=False)
        frame = orjson.loads(await bad.ws.recv())
        assert frame["code"] == "bad_request" and frame["seq"] == 0
        assert await closed_code(bad) == 4400


async def test_slow_consumer_is_cut_and_memory_stays_bounded():
    settings = server_settings(send_queue_frames=64, send_timeout_s=1.0, replay_frames=128)
    async with run_server(settings) as srv:
        c = await WSClient.connect(srv.url, token="tok1", max_queue=4)
        rid = await c.send("run_code", code="i = 0\nwhile True:\n    print('x' * 200, i)\n    i += 1", timeout_s=120)
        session = srv.state.manager.sessions[c.session_id]
        # the client reads nothing: the server's send blocks, times out, and the socket is cut
        await asyncio.wait_for(session.detached.wait(), 120)
        stats = session.outbox.stats()
        assert stats["max_unsent_seen"] <= 64 + 1
        assert stats["buffered"] <= 128 + 64 + 1
        # the flood is paused, not dropped: the run is still in flight and nothing more was queued
        assert rid in session.inflight and session.outbox.unsent <= 64
        c.ws.transport.abort()
        await c.ws.wait_closed()
        async with await WSClient.connect(srv.url, token="tok1", session=c.session_id, last_seq=c.last_seq) as c2:
            await c2.send("cancel", target=rid)
            frames = await c2.until_done(rid)
            assert frames[-1]["error"]["name"] == "Cancelled"
            assert any(f["type"] == "gap" for f in c2.frames)  # sent frames were evicted past 128


async def test_reaping_after_grace_and_idle():
    async with run_server(server_settings(resume_grace_s=0.3)) as srv:
        c = await WSClient.connect(srv.url, token="tok1")
        session = srv.state.manager.sessions[c.session_id]
        await c.ws.close()
        await asyncio.wait_for(session.closed.wait(), 60)
        again = await WSClient.connect(srv.url, token="tok1", session=c.session_id, last_seq=1, expect_ready=False)
        assert orjson.loads(await again.ws.recv())["code"] == "not_found"
    async with run_server(server_settings(idle_timeout_s=0.5)) as srv:
        c = await WSClient.connect(srv.url, token="tok1")
        assert (await c.call("ping"))["ok"]
        assert await closed_code(c) == 4410


async def test_shutdown_with_sessions_open_leaves_no_container():
    import docker

    async with run_server(server_settings()) as srv:
        c1 = await WSClient.connect(srv.url, token="tok1")
        c2 = await WSClient.connect(srv.url, token="tok2")
        rid = await c1.send("run_code", code="import time\nprint('on', flush=True)\ntime.sleep(60)")
        while not c1.of(rid, "stdout"):
            await c1.recv()
        detached = await WSClient.connect(srv.url, token="tok2")
        await detached.ws.close()
    for c in (c1, c2):
        assert await closed_code(c) in (1012, 1001)

    def running():
        with contextlib.closing(docker.from_env()) as client:  # an unclosed client's socket warns, as an error
            return client.api.containers(filters={"label": [f"groundloop.namespace={NAMESPACE}"], "status": "running"})

    assert await asyncio.to_thread(running) == []


@pytest.mark.slow
async def test_fifty_concurrent_sessions():
    settings = server_settings(max_sessions_per_user=64)
    async with run_server(settings) as srv:

        async def one(i: int) -> str:
            async with await WSClient.connect(srv.url, token="tok1" if i % 2 else "tok2") as c:
                frames = await c.request("run_code", code=f"print({i} * 2)")
                assert frames[-1]["ok"], frames[-1]
                return WSClient.text(frames)

        outs = await asyncio.gather(*(one(i) for i in range(50)))
        assert outs == [f"{i * 2}\n" for i in range(50)]
        assert len(srv.state.manager.sessions) == 50
