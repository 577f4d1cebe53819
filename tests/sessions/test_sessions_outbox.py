"""The outbox: seq, the replay buffer, the send-queue limit, rewind on resume."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from groundloop.sessions.manager import TokenBucket
from groundloop.sessions.outbox import Outbox, ResumeError


def box(**kw):
    values = {"replay_frames": 100, "replay_bytes": 1 << 20, "high": 8}
    values.update(kw)
    return Outbox(**values)


async def next_frame(ob: Outbox) -> tuple[int, bytes, float]:
    """What the writer does for one frame: wait for it, take it, frame it with its seq."""
    await ob.wait_unsent()
    f = ob.peek_frames(1)[0]
    return f.seq, f.wire(), f.t


async def send_all(ob: Outbox) -> list[dict]:
    out = []
    while ob.unsent:
        seq, data, _ = await next_frame(ob)
        out.append(orjson.loads(data))
        ob.mark_sent(seq)
    return out


async def test_seq_and_send():
    ob = box()
    for i in range(3):
        assert await ob.put({"type": "stdout", "text": str(i)}) == i + 1
    frames = await send_all(ob)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert frames[0] == {"seq": 1, "type": "stdout", "text": "0"}


async def test_put_blocks_at_high_water_and_resumes_at_low():
    ob = box(high=4, low=1)
    for i in range(4):
        ob.put_nowait({"type": "x", "i": i})
    blocked = asyncio.ensure_future(ob.put({"type": "x", "i": 4}))
    await asyncio.sleep(0)
    assert not blocked.done()
    for _ in range(2):
        seq, _, _ = await next_frame(ob)
        ob.mark_sent(seq)
    await asyncio.sleep(0)
    assert not blocked.done()  # 2 unsent > low water 1
    seq, _, _ = await next_frame(ob)
    ob.mark_sent(seq)
    assert await blocked == 5


async def test_only_sent_frames_are_evicted():
    ob = box(replay_frames=3, high=100)
    for i in range(10):
        ob.put_nowait({"type": "x", "i": i})
    assert ob.buffered == 10  # nothing sent: nothing evicted
    await send_all(ob)
    assert ob.buffered == 3 and ob.evicted == 7


async def test_replay_bytes_limit():
    ob = box(replay_frames=1000, replay_bytes=100, high=1000)
    for _ in range(20):
        ob.put_nowait({"type": "x", "pad": "y" * 20})
    await send_all(ob)
    assert ob.stats()["replay_bytes"] <= 100


async def test_rewind_renumbers_after_last_seq():
    ob = box()
    for i in range(5):
        ob.put_nowait({"type": "x", "i": i})
    await send_all(ob)  # client got 1..3 only, say
    replayed, missed = ob.rewind(3, {"type": "ready", "resumed": True})
    assert (replayed, missed) == (2, 0)
    frames = await send_all(ob)
    assert [(f["seq"], f["type"], f.get("i")) for f in frames] == [(4, "ready", None), (5, "x", 3), (6, "x", 4)]
    assert await ob.put({"type": "x", "i": 5}) == 7


async def test_rewind_with_evicted_frames_sends_a_gap():
    ob = box(replay_frames=2)
    for i in range(6):
        ob.put_nowait({"type": "x", "i": i})
    await send_all(ob)  # keeps seq 5, 6
    replayed, missed = ob.rewind(1, {"type": "ready"})
    assert (replayed, missed) == (2, 3)
    frames = await send_all(ob)
    assert [f["type"] for f in frames] == ["ready", "gap", "x", "x"]
    assert [f["seq"] for f in frames] == [2, 3, 4, 5]
    assert frames[1]["missed"] == 3 and [f["i"] for f in frames[2:]] == [4, 5]


async def test_rewind_past_what_was_sent_is_refused():
    ob = box()
    ob.put_nowait({"type": "x"})
    with pytest.raises(ResumeError):
        ob.rewind(1, {"type": "ready"})


async def test_close_wakes_producers():
    ob = box(high=1)
    ob.put_nowait({"type": "x"})
    blocked = asyncio.ensure_future(ob.put({"type": "x"}))
    await asyncio.sleep(0)
    ob.close()
    with pytest.raises(ConnectionError):
        await blocked


def test_token_bucket():
    b = TokenBucket(rate=1.0, burst=2, clock=lambda: 0.0)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert b.take(1.0) and not b.take(1.0)


async def test_peek_frames_for_batched_writes():
    ob = box()
    for i in range(5):
        await ob.put({"type": "stdout", "text": str(i)})
    seq, _, _ = await next_frame(ob)
    ob.mark_sent(seq)
    batch = ob.peek_frames(3)
    assert [f.seq for f in batch] == [2, 3, 4]
    assert [orjson.loads(f.wire()) for f in batch] == [
        {"seq": n + 1, "type": "stdout", "text": str(n)} for n in (1, 2, 3)
    ]
    assert ob.attempted_seq == 4 and ob.sent_seq == 1  # handed to the socket, not yet written
    for f in batch:
        ob.mark_sent(f.seq)
    assert ob.unsent == 1 and [f.seq for f in ob.peek_frames(64)] == [5]


async def test_put_blocks_at_the_byte_budget_too():
    """Issue 21, item 4: a few big frames fill the queue long before the frame count does."""
    ob = box(high=1000, high_bytes=1000)
    ob.put_nowait({"type": "x", "text": "a" * 600})
    assert not ob.full
    ob.put_nowait({"type": "x", "text": "b" * 600})
    assert ob.full and ob.unsent == 2 and ob.unsent_bytes > 1000
    blocked = asyncio.ensure_future(ob.put({"type": "x", "text": "c"}))
    await asyncio.sleep(0)
    assert not blocked.done()
    seq, _, _ = await next_frame(ob)
    ob.mark_sent(seq)
    await asyncio.sleep(0)
    assert not blocked.done()  # ~600 bytes unsent, over the low mark (500)
    seq, _, _ = await next_frame(ob)
    ob.mark_sent(seq)
    assert await blocked == 3 and ob.unsent_bytes == len(ob.peek_frames(1)[0].rest)
    assert ob.stats()["max_unsent_bytes_seen"] > 1000


async def test_rewind_counts_every_kept_frame_as_unsent_bytes():
    ob = box(high=1000, high_bytes=10_000)
    for _ in range(3):
        ob.put_nowait({"type": "x", "text": "a" * 1000})
    await send_all(ob)
    assert ob.unsent_bytes == 0
    ob.rewind(1, {"type": "ready"})
    assert ob.unsent == 3 and ob.unsent_bytes == sum(len(f.rest) for f in ob.peek_frames(10))


async def test_wait_turn_does_not_starve_behind_a_refilling_producer():
    """The frame handler waits for room once; a producer woken first that fills the queue again does
    not send it back to waiting (wait_room would)."""
    ob = box(high=2, low=0)
    ob.put_nowait({"type": "x"})
    ob.put_nowait({"type": "x"})

    async def producer():
        while True:
            await ob.put({"type": "flood"})

    flood = asyncio.ensure_future(producer())
    await asyncio.sleep(0)
    turn = asyncio.ensure_future(ob.wait_turn())
    await asyncio.sleep(0)
    assert not turn.done()
    await send_all(ob)  # room: the producer, waiting longer, refills the queue before the handler runs
    await asyncio.sleep(0)
    assert turn.done() and ob.full
    flood.cancel()
    ob.close()
    with pytest.raises(ConnectionError):
        await ob.wait_turn()


async def test_check_rewind_changes_nothing():
    """Issue 21, item 9: a resume is validated before it takes the session over."""
    ob = box()
    ob.put_nowait({"type": "x"})
    with pytest.raises(ResumeError):
        ob.check_rewind(1)
    assert ob.unsent == 1 and ob.next_seq == 2
    await send_all(ob)
    ob.check_rewind(1)
