"""The session without Docker: states, dispatch, streaming, cancel races, lost sandboxes, resume, limits.

Over the fake backend (tests/support/fake_sandbox.py): the real Session, SessionManager, Outbox and
Sandbox classes, a fake agent in this process.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from groundloop.sessions.inflight import InFlight, ReqState, RequestTable, outcome_of
from groundloop.sessions.outbox import ResumeError
from groundloop.sessions.protocol import REQUEST_TYPES, Request
from groundloop.sessions.session import SessionClosed, State
from support.units import FakeConn, Reader, done_count, harness


async def test_session_states_and_transitions():
    async with harness() as h:
        s = await h.manager.create("alice")
        assert s.state is State.STARTING
        c1 = FakeConn()
        await s.attach(c1)
        assert s.state is State.ATTACHED and not s.detached.is_set()
        s.detach(FakeConn())  # not its connection: nothing happens
        assert s.state is State.ATTACHED
        s.detach(c1)
        assert s.state is State.DETACHED and s.detached.is_set() and s.detached_at is not None
        with pytest.raises(RuntimeError, match=r"expected a state in \['ATTACHED', 'CLOSING'\], got CLOSED"):
            s.transition(State.CLOSED)
        await s.attach(FakeConn(), 0)  # resume
        assert s.state is State.ATTACHED and s.detached_at is None
        await h.manager.close_session(s, "test")
        assert s.state is State.CLOSED and s.closed.is_set() and not s.live
        assert s.id not in h.manager.sessions
        with pytest.raises(SessionClosed):
            await s.attach(FakeConn())
        await s.close()  # idempotent


def test_request_states():
    r = InFlight(Request("run_code", 7, {"code": "1"}))
    assert r.state is ReqState.NEW
    r.transition(ReqState.RUNNING)
    r.transition(ReqState.CANCELLING)
    with pytest.raises(RuntimeError, match=r"request 7 \(run_code\): expected a state in \['DONE'\], got RUNNING"):
        r.transition(ReqState.RUNNING)
    r.transition(ReqState.DONE)
    with pytest.raises(RuntimeError, match=r"expected a state in \[\], got DONE"):
        r.transition(ReqState.DONE)
    table = RequestTable()
    first = table.add(Request("run_code", 7, {"code": "1"}))
    with pytest.raises(ValueError, match="a request with id 7 is already in flight"):
        table.add(Request("run_code", 7, {"code": "2"}))  # an overwrite would orphan the first
    assert table.get(7) is first


async def test_every_request_type_has_a_starter():
    async with harness() as h:
        s, _ = await h.session()
        assert set(s._start) == REQUEST_TYPES - {"cancel"}


async def test_ready_ops_and_streaming():
    async with harness() as h:
        s, rd = await h.session()
        ready = await rd.next()
        assert ready["type"] == "ready" and ready["seq"] == 1 and ready["sandbox"]["backend"] == "fake"
        frames = await rd.request("run_code", 1, code="print:25")
        assert [f["text"] for f in frames if f["type"] == "stdout"] == [f"{i}\n" for i in range(25)]
        assert frames[-1]["type"] == "done" and frames[-1]["ok"] is True and done_count(frames, 1) == 1
        frames = await rd.request("run_code", 2, code="41 + 1")
        assert frames[0]["type"] == "result" and frames[0]["data"] == {"text/plain": "41 + 1"}
        assert (await rd.request("ping", 3))[0] == {"seq": frames[-1]["seq"] + 1, "type": "pong", "id": 3}
        assert (await rd.request("write_file", 4, path="a", content="x"))[-1]["ok"]
        assert (await rd.request("read_file", 5, path="a"))[-1]["content"] == "x"
        bad = (await rd.request("run_code", 6, code="raise"))[-1]
        assert bad["ok"] is False and bad["error"]["name"] == "ZeroDivisionError"
        ex = (await rd.request("exec", 7, command="exit 3"))[-1]
        assert ex["ok"] is True and ex["exit_code"] == 3
        started = await rd.request("start_process", 8, command="srv")
        proc = started[-1]["process_id"]
        assert proc.startswith("proc-")
        out = await rd.until(lambda f: f["type"] == "exit")
        assert out == {"seq": out["seq"], "type": "exit", "id": 8, "process_id": proc, "exit_code": 0}
        assert proc not in s.procs  # forgotten at its exit: the map does not grow with every process
        assert [f["text"] for f in rd.frames if f["type"] == "stdout" and f.get("process_id")] == ["srv\n"]
        seqs = [f["seq"] for f in rd.frames]
        assert seqs == list(range(1, len(seqs) + 1))
        assert not s.requests and h.metrics.inflight._value.get() == 0


async def test_bad_frames_get_errors_and_one_done():
    async with harness() as h:
        s, rd = await h.session()
        await rd.next()
        await s.handle_frame(b"not json")
        err = await rd.next()
        assert err["type"] == "error" and err["code"] == "bad_request" and "id" not in err
        await s.handle_frame(orjson.dumps({"type": "nope", "id": "x"}))
        assert (await rd.next())["code"] == "bad_request"
        done = await rd.next()
        assert done["type"] == "done" and done["id"] == "x" and done["error"]["name"] == "BadRequest"
        # a second request under an id in flight is refused, and the first goes on
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": "g", "code": "gate:g"}))
        await s.handle_frame(orjson.dumps({"type": "ping", "id": "g"}))
        err = await rd.next()
        assert err["code"] == "bad_request" and "already in flight" in err["message"]
        h.agent(s).gate("g").set()
        frames = await rd.request("ping", "after")
        assert frames[0]["type"] == "pong"
        await rd.done("g")
        assert done_count(rd.frames, "g") == 1


async def test_cancel_a_running_op_reaches_the_agent():
    async with harness() as h:
        s, rd = await h.session()
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "gate:never"}))
        assert s.requests.get(1).state is ReqState.RUNNING
        frames = await rd.request("cancel", 2, target=1)
        assert frames[-1]["found"] is True and frames[-1]["ok"] is True
        done = await rd.done(1)
        assert done["ok"] is False and done["error"]["name"] == "Cancelled"
        assert [f["target"] for f in h.agent(s).ops("cancel")] == ["run_code-1"]
        # once it is done, a cancel finds nothing
        assert (await rd.request("cancel", 3, target=1))[-1]["found"] is False
        assert done_count(rd.frames, 1) == 1


async def test_cancel_twice_and_cancel_after_the_agent_answered():
    async with harness() as h:
        s, rd = await h.session()
        agent = h.agent(s)
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "gate:a"}))
        await s.handle_frame(orjson.dumps({"type": "cancel", "id": 2, "target": 1}))
        await s.handle_frame(orjson.dumps({"type": "cancel", "id": 3, "target": 1}))
        await rd.done(1)
        assert len(agent.ops("cancel")) == 1  # the second cancel found it CANCELLING: nothing more to do
        # The agent's done and the cancel cross: the agent answers ok first, the cancel comes too late.
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 4, "code": "gate:b"}))
        agent.gate("b").set()
        while 4 in s.requests:
            await asyncio.sleep(0)
        await s.handle_frame(orjson.dumps({"type": "cancel", "id": 5, "target": 4}))
        assert (await rd.done(5))["found"] is False
        assert (await rd.done(4))["ok"] is True
        assert done_count(rd.frames, 1) == 1 and done_count(rd.frames, 4) == 1


async def test_lost_sandbox_is_replaced_and_queued_ops_keep_their_order():
    async with harness() as h:
        s, rd = await h.session()
        await rd.next()
        old = s.sb
        h.backend.hold_starts = asyncio.Event()  # the replacement waits until the test lets it go
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "die"}))
        lost = await rd.done(1)
        assert lost["ok"] is False and lost["error"]["name"] == "SandboxLost"
        # During the replacement, ops get a task and wait in arrival order; a cancel of one that
        # has not run yet ends it without reaching any sandbox.
        for i in range(2, 6):
            await s.handle_frame(orjson.dumps({"type": "write_file", "id": i, "path": "f", "content": str(i)}))
        assert all(s.requests.get(i).task is not None for i in range(2, 6)) and len(s.requests.queued) == 4
        await s.handle_frame(orjson.dumps({"type": "cancel", "id": 6, "target": 3}))
        await s.handle_frame(orjson.dumps({"type": "ping", "id": 7}))  # not an agent op: answered at once
        h.backend.hold_starts.set()
        replaced = await rd.until(lambda f: f["type"] == "sandbox_replaced")
        assert replaced["state_lost"] is True and s.sb is not old
        for i in (2, 4, 5):
            assert (await rd.done(i))["ok"] is True
        assert (await rd.done(3))["error"]["name"] == "Cancelled"
        agent = h.agent(s)
        assert [f["content"] for f in agent.ops("write_file")] == ["2", "4", "5"]
        assert agent.files == {"f": "5"} and not s.requests.queued
        assert h.backend.closed == 1  # the dead one was released
        assert (await rd.request("run_code", 8, code="print:1"))[-1]["ok"]


async def test_sandbox_that_cannot_be_replaced_closes_the_session():
    async with harness() as h:
        conn = FakeConn()
        s, rd = await h.session(conn=conn)
        h.backend.fail_starts = 1
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "die"}))
        await asyncio.wait_for(s.closed.wait(), 30)
        # the outbox is closed; what it holds is what a connection would have been sending
        frames = rd.pending()
        assert [f["type"] for f in frames] == ["ready", "done", "error"]
        assert frames[1]["error"]["name"] == "SandboxLost" and frames[2]["code"] == "sandbox_unavailable"
        assert conn.closed is not None and conn.closed[0] == 4410 and s.id not in h.manager.sessions


async def test_limits_in_flight_and_rate():
    async with harness(max_inflight=2, rate_per_s=0.001, rate_burst=4) as h:
        s, rd = await h.session()
        for i in (1, 2, 3):
            await s.handle_frame(orjson.dumps({"type": "run_code", "id": i, "code": "gate:g"}))
        err = await rd.until(lambda f: f["type"] == "error")
        assert err["code"] == "busy" and err["id"] == 3
        done = await rd.done(3)
        assert done["error"]["name"] == "Busy"
        h.agent(s).gate("g").set()
        await rd.done(1)
        await rd.done(2)
        # 2 tokens of the burst of 4 are spent (the busy one took none): two more pass, then no more
        for i in (4, 5, 6):
            await s.handle_frame(orjson.dumps({"type": "ping", "id": i}))
        err = await rd.until(lambda f: f["type"] == "error")
        assert err["code"] == "rate_limited" and err["id"] == 6
        assert (await rd.done(6))["error"]["name"] == "RateLimited"
        assert [f["type"] for f in rd.frames if f.get("id") in (4, 5)] == ["pong", "done", "pong", "done"]
        text = h.metrics.exposition().decode()
        assert 'groundloop_requests_total{outcome="busy",type="rejected"} 1.0' in text
        assert 'groundloop_requests_total{outcome="rate_limited",type="rejected"} 1.0' in text
        assert 'groundloop_errors_total{code="busy"} 1.0' in text


async def test_backpressure_pauses_the_sandbox_while_nobody_reads():
    async with harness(send_queue_frames=16) as h:
        s, rd = await h.session()
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "print:500"}))
        while s.outbox.unsent < s.outbox.high:
            await asyncio.sleep(0)
        for _ in range(20):  # the agent has sent all 500 lines; the reader is parked at the limit
            await asyncio.sleep(0)
        assert s.outbox.unsent == 16 and 1 in s.requests
        frames = [await rd.next() for _ in range(1 + 500 + 1)]  # ready, 500 lines, done
        assert [f["text"] for f in frames if f["type"] == "stdout"] == [f"{i}\n" for i in range(500)]
        assert frames[-1]["type"] == "done" and s.outbox.max_unsent_seen <= 16 + 1


async def test_resume_replays_then_gap_then_refuses_the_future():
    async with harness(replay_frames=8) as h:
        c1 = FakeConn()
        s, rd = await h.session(conn=c1)
        frames = await rd.request("run_code", 1, code="print:30")
        last = rd.frames[-1]["seq"]
        assert last == 1 + 30 + 1
        # the client saw up to seq 5; only the last 8 frames are kept: a gap, then the 8
        c2 = FakeConn()
        await s.attach(c2, 5)
        assert c1.kicked and c1.closed == (4409, "taken over by another connection")
        rd2 = Reader(s)
        ready = await rd2.next()
        assert ready["type"] == "ready" and ready["resumed"] is True and ready["seq"] == 6
        gap = await rd2.next()
        assert gap["type"] == "gap" and gap["missed"] == last - 5 - 8
        kept = [await rd2.next() for _ in range(8)]
        assert [f["text"] for f in kept[:-1]] == [f"{i}\n" for i in range(23, 30)] and kept[-1] == {
            **frames[-1],
            "seq": kept[-1]["seq"],
        }
        assert [f["seq"] for f in [ready, gap, *kept]] == list(range(6, 6 + 10))
        with pytest.raises(ResumeError):
            await s.attach(FakeConn(), 10_000)
        # nothing lost: resuming at the end replays nothing and needs no gap
        end = kept[-1]["seq"]
        await s.attach(FakeConn(), end)
        assert (await Reader(s).next())["seq"] == end + 1 and s.outbox.unsent == 0


async def test_requests_run_on_while_detached_and_close_cancels_them():
    async with harness() as h:
        conn = FakeConn()
        s, rd = await h.session(conn=conn)
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "gate:g"}))
        s.detach(conn)
        h.agent(s).gate("g").set()
        await asyncio.sleep(0)
        await s.attach(FakeConn(), 0)
        assert (await Reader(s).done(1))["ok"] is True
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 2, "code": "gate:never"}))
        await h.manager.close_session(s, "test")
        assert not s.requests and s.outbox.closed and h.backend.closed == 1
        assert h.metrics.inflight._value.get() == 0


@pytest.mark.parametrize(
    "done, outcome",
    [
        ({"ok": True}, "ok"),
        ({"ok": True, "exit_code": 3}, "error"),
        ({"ok": False, "error": {"name": "WorkerDied", "message": ""}}, "error"),
        ({"ok": False, "error": {"name": "SandboxLost", "message": ""}}, "lost"),
    ],
)
def test_one_outcome_mapping(done, outcome):
    from groundloop.server import metrics

    assert outcome_of(done) == outcome and metrics.outcome_of is outcome_of


async def test_outcomes_reach_the_metrics():
    async with harness() as h:
        s, rd = await h.session()
        await rd.request("run_code", 1, code="workerdied")
        await rd.request("exec", 2, command="exit 3")
        text = h.metrics.exposition().decode()
        assert 'groundloop_requests_total{outcome="error",type="run_code"} 1.0' in text
        assert 'groundloop_execution_seconds_count{kind="exec",language="shell",outcome="error"} 1.0' in text


async def test_assist_without_a_model_and_with_one():
    class Off:
        available = False

    async with harness(assist=Off()) as h:
        s, rd = await h.session()
        frames = await rd.request("assist", 1, prompt="hi")
        assert frames[0]["code"] == "llm_unavailable" and frames[-1]["error"]["name"] == "LLMUnavailable"

    class Scripted:
        available = True

        async def run(self, *, rid, prompt, language, max_iterations, context, emit, execute, scope):
            await emit({"type": "token", "text": "ok", "iteration": 1})
            result = await execute("print:3", language, 1)
            return {"ok": result["ok"], "iterations": 1, "output": result["output"]}

    async with harness(assist=Scripted()) as h:
        s, rd = await h.session()
        frames = await rd.request("assist", 1, prompt="count")
        assert [f["type"] for f in frames] == ["token", "stdout", "stdout", "stdout", "done"]
        assert all(f["iteration"] == 1 for f in frames[1:4]) and frames[-1]["output"] == "0\n1\n2\n"
        # the assist's first output keeps its own label
        assert 'groundloop_first_output_seconds_count{kind="assist"} 1.0' in h.metrics.exposition().decode()


async def test_cancel_of_assist_cancels_its_execution():
    class Waits:
        available = True

        async def run(self, *, rid, prompt, language, max_iterations, context, emit, execute, scope):
            await execute("gate:never", language, 1)
            raise AssertionError("not reached")

    async with harness(assist=Waits()) as h:
        s, rd = await h.session()
        await s.handle_frame(orjson.dumps({"type": "assist", "id": 1, "prompt": "x"}))
        while not h.agent(s).ops("run_code"):
            await asyncio.sleep(0)
        await s.handle_frame(orjson.dumps({"type": "cancel", "id": 2, "target": 1}))
        done = await rd.done(1)
        assert done["error"]["name"] == "Cancelled" and h.agent(s).ops("cancel")
        assert not s._tasks and all(t.done() for t in [r.task for r in s.requests.values()] if t)


async def test_close_ends_requests_whose_task_never_ran():
    """A request whose task is cancelled before its first step (the session closes in the same turn)
    still leaves the table and the in-flight gauge."""
    async with harness() as h:
        s, rd = await h.session()
        h.backend.hold_starts = asyncio.Event()
        await s.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "die"}))
        await rd.done(1)
        while s._sb_ready.is_set():
            await asyncio.sleep(0)
        await s.handle_frame(orjson.dumps({"type": "write_file", "id": 2, "path": "f", "content": "x"}))
        await s.handle_frame(orjson.dumps({"type": "assist", "id": 3, "prompt": "x"}))
        assert s.requests.get(2).task is not None and s.requests.get(3).task is not None
        await h.manager.close_session(s, "test")  # no turn of the loop between: neither task has run
        assert not s.requests and h.metrics.inflight._value.get() == 0


async def _fill(s, c) -> None:
    """Park the session's producers: a flood nobody reads fills the send queue."""
    await s.handle_frame(orjson.dumps({"type": "run_code", "id": "flood", "code": "print:100"}), c)
    while not s.outbox.full:
        await asyncio.sleep(0)


async def test_a_request_resent_across_a_takeover_runs_once():
    """The old connection's reader waits its turn with frame x when the client resumes and resends x:
    the old frame is dropped (its connection was taken over), the resend runs once, with one done."""
    async with harness(send_queue_frames=16) as h:
        c1 = FakeConn()
        s, rd = await h.session(conn=c1)
        last = (await rd.next())["seq"]
        await _fill(s, c1)
        x = orjson.dumps({"type": "run_code", "id": "x", "code": "gate:x"})
        old = asyncio.create_task(s.handle_frame(x, c1))
        await asyncio.sleep(0)
        c2 = FakeConn()
        await s.attach(c2, last)
        assert c1.kicked
        resent = asyncio.create_task(s.handle_frame(x, c2))
        await asyncio.sleep(0)
        assert not old.done() and not resent.done() and "x" not in s.requests  # both wait their turn
        rd2 = Reader(s)
        await rd2.done("flood")  # reading makes room: both get their turn
        await asyncio.gather(old, resent)
        assert [op["code"] for op in h.agent(s).ops("run_code")] == ["print:100", "gate:x"]
        assert not [f for f in rd2.frames if f["type"] == "error"]
        h.agent(s).gate("x").set()
        await rd2.done("x")
        while s.requests:
            await asyncio.sleep(0)
        assert done_count(rd2.frames + rd2.pending(), "x") == 1 and h.metrics.inflight._value.get() == 0


async def test_a_duplicate_id_that_waited_its_turn_is_refused():
    """Two frames with one id both pass the first duplicate check while the send queue is full: the
    second to get its turn is a duplicate (the error frame only), the first runs with one done."""
    async with harness(send_queue_frames=16) as h:
        s, rd = await h.session()
        await _fill(s, None)
        x = orjson.dumps({"type": "run_code", "id": "x", "code": "gate:x"})
        first = asyncio.create_task(s.handle_frame(x))
        second = asyncio.create_task(s.handle_frame(x))
        await asyncio.sleep(0)
        assert not first.done() and not second.done()
        await rd.done("flood")
        await asyncio.gather(first, second)
        assert len(h.agent(s).ops("run_code")) == 2  # the flood and x, once
        h.agent(s).gate("x").set()
        done = await rd.done("x")
        assert done["ok"] is True and done_count(rd.frames, "x") == 1
        errors = [f for f in rd.frames if f["type"] == "error"]
        assert [(e["code"], e["id"]) for e in errors] == [("bad_request", "x")]
        assert "already in flight" in errors[0]["message"] and not s.requests


class _SlowKick(FakeConn):
    """An old connection whose close takes long (a dead peer): the takeover waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.kicking = asyncio.Event()
        self.release = asyncio.Event()

    async def kick_for_takeover(self) -> None:
        self.kicking.set()
        await self.release.wait()
        await super().kick_for_takeover()


async def test_a_resume_that_races_a_close_is_refused_as_closed():
    """The reaper (or the drain) closes the session while a resume waits for the old connection's
    close: the resume gets SessionClosed (the connection answers not_found, 4404), not a crash."""
    async with harness() as h:
        old = _SlowKick()
        s, _ = await h.session(conn=old)
        new = FakeConn()
        resume = asyncio.create_task(s.attach(new, 0))
        await old.kicking.wait()
        await h.manager.close_session(s, "resume_grace")
        old.release.set()
        with pytest.raises(SessionClosed):
            await resume
        assert s.state is State.CLOSED and s.conn is None and new.closed is None
