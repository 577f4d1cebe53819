"""The server's reader of the agent stream (sandbox/base.py) fed forged and garbage frames: everything
from the agent is untrusted (issue 21, items 4, 5 and 12). No Docker: the test writes the stream."""

from __future__ import annotations

import asyncio
import logging
import struct

import orjson
import pytest
from groundloop.sandbox import framing
from groundloop.sandbox.base import Sandbox, SandboxLost, State
from groundloop.sandbox.settings import SandboxSettings
from support.system import rss


class Sink:
    """The agent's stdin as the Sandbox sees it: what it writes is kept."""

    def __init__(self):
        self.frames: list[dict] = []

    def write(self, data: bytes) -> None:
        self.frames.extend(orjson.loads(line) for line in data.splitlines() if line)

    def close(self) -> None:
        pass


def mux(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def line(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


async def started(docker_mux: bool = False, max_frame_bytes: int = 1 << 20):
    reader = asyncio.StreamReader()
    sink = Sink()
    sb = Sandbox(
        sandbox_id="test-reader-0123456789",
        session_id="s",
        backend="test",
        runtime="none",
        image="none",
        reader=reader,
        writer=sink,
        docker_mux=docker_mux,
        max_frame_bytes=max_frame_bytes,
    )
    hello = line({"ev": "hello", "agent": 1, "pid": 7})
    reader.feed_data(mux(framing.STDOUT, hello) if docker_mux else hello)
    await sb.handshake(5)
    return sb, reader, sink


class Collect:
    def __init__(self):
        self.events: list[dict] = []

    async def __call__(self, ev):
        self.events.append(ev)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_done_carries_only_the_protocols_fields_and_only_the_first_counts():
    sb, reader, sink = await started()
    got = Collect()
    fut = sb.submit("run_code", {"code": "1"}, got)
    rid = sink.frames[-1]["rid"]
    assert sink.frames[-1]["max_frame_bytes"] == 1 << 20  # the agent is told the bound
    reader.feed_data(
        line({"ev": "done", "rid": rid, "ok": True, "type": "stdout", "seq": 0, "id": "other", "context": "c"})
        + line({"ev": "done", "rid": rid, "ok": False, "error": {"name": "Second"}})
        + line({"ev": "out", "rid": rid, "s": "stdout", "lines": ["after the done\n"]})
    )
    done = await asyncio.wait_for(fut, 5)
    assert done == {"ev": "done", "rid": rid, "ok": True, "context": "c"}
    await settle()
    assert got.events == []  # nothing of a request after its done
    assert sb.state == State.READY
    assert rid not in sb._pending
    await sb.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"ev": "done", "rid": ["not", "a", "string"], "ok": True},
        {"ev": "done", "rid": {"a": 1}, "ok": True},
        {"ev": "done", "rid": "r1", "ok": "yes"},
        {"ev": "done", "rid": "r1", "ok": True, "exit_code": "0"},
        {"ev": "done", "rid": "r1", "ok": False, "error": "boom"},
        {"ev": "done", "rid": "r1", "ok": False, "error": {"name": 5}},
        {"ev": "out", "rid": "r1", "s": "stdin", "lines": ["x"]},
        {"ev": "out", "rid": "r1", "s": "stdout", "lines": "x"},
        {"ev": "out", "rid": "r1", "s": "stdout", "lines": [1]},
        {"ev": "result", "rid": "r1", "data": "x"},
        {"ev": "pout", "proc": 1, "s": "stdout", "lines": []},
        {"ev": "pexit", "proc": "p", "exit_code": "x"},
        {"ev": "log", "message": {"x": 1}},
        {"ev": "lost", "reason": "forged"},
        {"ev": "surprise"},
        {"no": "ev"},
    ],
)
async def test_a_forged_or_garbled_event_loses_the_sandbox_and_every_request_still_ends(frame):
    sb, reader, sink = await started()
    lost = asyncio.Event()

    async def listener(ev):
        if ev.get("ev") == "lost":
            lost.set()

    sb.set_listener(listener)
    fut = sb.submit("exec", {"command": "true"}, rid="r1")
    reader.feed_data(line(frame))
    with pytest.raises(SandboxLost, match="expected"):
        await asyncio.wait_for(fut, 5)
    await asyncio.wait_for(lost.wait(), 5)
    assert sb.state == State.LOST
    await sb.close()


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1,2]\n", b"\xff\xfe\n", b'"a string"\n'])
async def test_garbage_lines_lose_the_sandbox(garbage):
    sb, reader, sink = await started()
    fut = sb.submit("ping", rid="r1")
    reader.feed_data(garbage)
    with pytest.raises(SandboxLost, match="expected a JSON object"):
        await asyncio.wait_for(fut, 5)
    await sb.close()


def test_check_event_passes_what_the_agent_sends():
    ok = [
        {"ev": "hello", "agent": 1, "pid": 7, "languages": ["python"]},
        {"ev": "out", "rid": "r1", "s": "stderr", "lines": ["a\n", "b"]},
        {"ev": "result", "rid": "r1", "data": {"text/plain": "1"}, "main": True},
        {"ev": "pout", "proc": "proc-1", "s": "stdout", "lines": ["x\n"]},
        {"ev": "pexit", "proc": "proc-1", "exit_code": None},
        {"ev": "log", "level": "error", "message": "m"},
    ]
    for ev in ok:
        assert framing.check_event(dict(ev)) == ev
    done = {
        "ev": "done",
        "rid": "r1",
        "ok": False,
        "error": {"name": "Timeout", "message": "m", "traceback": "t", "extra": "dropped"},
        "exit_code": 137,
        "state_lost": True,
        "truncated": True,
        "agent_ms": 1.5,
    }
    checked = framing.check_event(done)
    assert checked["error"] == {"name": "Timeout", "message": "m", "traceback": "t"}
    assert {k: v for k, v in checked.items() if k != "error"} == {k: v for k, v in done.items() if k != "error"}


# ---- item 4: the stream's buffers are held to a budget from the settings


def test_the_frame_budget_follows_the_settings():
    small = SandboxSettings(max_output_bytes=1 << 20, max_file_bytes=2 << 20)
    big = SandboxSettings(max_output_bytes=1 << 20, max_file_bytes=64 << 20)
    assert small.max_frame_bytes < big.max_frame_bytes
    # Room for the largest legitimate answer: a file read back as base64 (4/3 of its size) in JSON.
    assert big.max_frame_bytes > (64 << 20) * 4 // 3 + 1024
    assert SandboxSettings().max_frame_bytes < 64 << 20  # far below the 256 MiB it was


@pytest.mark.parametrize("docker_mux", [False, True])
async def test_a_line_without_end_loses_the_sandbox_at_the_budget_not_at_200_mib(docker_mux):
    budget = 8 << 20
    sb, reader, sink = await started(docker_mux=docker_mux, max_frame_bytes=budget)
    fut = sb.submit("ping", rid="r1")
    chunk = b"x" * (1 << 20)
    before = rss()
    sent = 0
    while sent < (200 << 20) and sb.state == State.READY:
        reader.feed_data(mux(framing.STDOUT, chunk) if docker_mux else chunk)
        sent += len(chunk)
        await asyncio.sleep(0)  # the reader runs; the feeding stops as soon as it gave up
        while len(reader._buffer) > (4 << 20) and sb.state == State.READY:
            await asyncio.sleep(0)
    grown = rss() - before
    with pytest.raises(SandboxLost, match="expected"):
        await asyncio.wait_for(fut, 5)
    assert sent < 32 << 20, sent
    assert grown < 64 << 20, f"the server grew by {grown >> 20} MiB"
    await sb.close()


async def test_a_huge_docker_frame_header_is_refused_before_it_is_buffered():
    sb, reader, sink = await started(docker_mux=True, max_frame_bytes=1 << 20)
    fut = sb.submit("ping", rid="r1")
    reader.feed_data(struct.pack(">BxxxL", 1, 1 << 31))
    with pytest.raises(SandboxLost, match="attach frame of at most"):
        await asyncio.wait_for(fut, 5)
    await sb.close()


# ---- item 12: the sandbox's stderr reaches the server's log escaped and rate-limited


async def test_sandbox_stderr_is_escaped_and_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger="groundloop.sandbox")
    sb, reader, sink = await started(docker_mux=True)
    heard: list[dict] = []

    async def listener(ev: dict) -> None:  # a session listens: log events must not reach it raw (review finding)
        heard.append(ev)

    sb.set_listener(listener)
    ansi = b"\x1b[2J\x1b[31mred\x1b[0m\r" + b"A" * 5000 + b"\n"
    reader.feed_data(mux(framing.STDOUT, line({"ev": "log", "message": "\x1b]0;title\x07log event"})))
    total = 0
    for _ in range(2000):  # 10 MB of escapes and long lines
        reader.feed_data(mux(framing.STDERR, ansi * 1))
        total += len(ansi)
    await settle()
    for _ in range(100):
        if not reader._buffer:
            break
        await asyncio.sleep(0.01)
    await sb.close()
    records = [r for r in caplog.records if r.name == "groundloop.sandbox"]
    text = "\n".join(r.getMessage() for r in records)
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "\\x1b[31mred" in text and "\\x1b]0;title\\x07log event" in text
    logged = sum(len(r.getMessage()) for r in records)
    assert logged < 400_000, f"{logged} characters logged for {total} bytes of stderr"
    assert any("not logged" in r.getMessage() for r in records)  # the dropped lines are counted, not lost silently
    assert not [ev for ev in heard if ev.get("ev") == "log"]
