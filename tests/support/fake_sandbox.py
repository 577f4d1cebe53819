"""A sandbox backend for the unit tier: the real ``Sandbox`` (sandbox/base.py), talking NDJSON to an
in-process fake agent instead of a container. No Docker, no subprocess.

The fake agent speaks the agent's wire protocol (sandbox/agent/agent.py): ``hello`` first, then
for every op ``out``/``result`` events and exactly one ``done``; ``cancel`` interrupts an op;
``start_process`` emits ``pout``/``pexit`` later. Its ``run_code`` understands a tiny script
language so tests can pick a behaviour:

=================  ==========================================================================
``print:N``        N stdout lines ``"0\\n"`` .. ``"N-1\\n"``, in events of 10 lines, then ok
``gate:NAME``      wait until the test opens ``agent.gate(NAME)``, then ``print:1``; a cancel
                   or the op's ``timeout_s`` ends it first (``Cancelled`` / ``Timeout``)
``raise``          ok:false ``ZeroDivisionError``
``workerdied``     ok:false ``WorkerDied`` (the worker took down by the code)
``die``            the agent's stream ends: the sandbox is lost under the request
``hang``           never answers (the server's deadline takes it as hung)
anything else      one ``result`` (``text/plain``: the code), then ok
=================  ==========================================================================

``exec`` prints the command and answers ``exit_code`` N for ``exit N``. Files live in a dict.
``FakeBackend.agents`` maps sandbox ids to their agents; ``seen`` lists every op an agent got.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from groundloop.sandbox import framing
from groundloop.sandbox.base import Sandbox, SandboxUnavailable


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing


class _Writer:
    """The server's end towards the agent: every line written is handed to the agent."""

    def __init__(self, agent: FakeAgent):
        self.transport = _Transport()
        self._agent = agent
        self._lines = framing.LineSplitter()

    def write(self, data: bytes) -> None:
        if self.transport.closing:
            raise ConnectionError("closed")
        for line in self._lines.feed(data):
            if line:
                self._agent.receive(framing.decode(line))

    def close(self) -> None:
        self.transport.closing = True
        self._agent.stop()

    async def drain(self) -> None:
        return None


class FakeAgent:
    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.writer = _Writer(self)
        self.seen: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.cancels: dict[str, asyncio.Event] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self.stopped = False
        self._procs = itertools.count(1)
        self.emit({"ev": "hello", "agent": 1, "pid": 1, "languages": ["python", "javascript"]})

    # ---- the test's handles

    def gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    def ops(self, op: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.seen if op is None or f["op"] == op]

    def die(self) -> None:
        """The agent's stream ends (the container died)."""
        self.stop()

    # ---- the wire

    def emit(self, ev: dict[str, Any]) -> None:
        if not self.stopped:
            self.reader.feed_data(framing.encode(ev))

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.reader.feed_eof()
            for t in self.running.values():
                t.cancel()

    def receive(self, frame: dict[str, Any]) -> None:
        self.seen.append(frame)
        rid, op = frame.get("rid"), frame["op"]
        if op == "cancel":
            ev = self.cancels.get(frame.get("target"))
            if ev is not None:
                ev.set()
            if rid is not None:
                self.emit({"ev": "done", "rid": rid, "ok": True, "found": ev is not None})
            return
        assert isinstance(rid, str), frame
        self.cancels[rid] = asyncio.Event()
        self.running[rid] = asyncio.get_running_loop().create_task(self._run(rid, op, frame))

    async def _run(self, rid: str, op: str, frame: dict[str, Any]) -> None:
        try:
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                done = {"ok": False, "error": {"name": "UnknownOp", "message": f"unknown op {op!r}"}}
            else:
                done = await handler(rid, frame)
            if done is not None:
                self.emit({"ev": "done", "rid": rid, **done})
        finally:
            self.running.pop(rid, None)
            self.cancels.pop(rid, None)

    def _out(self, rid: str, lines: list[str], stream: str = "stdout") -> None:
        self.emit({"ev": "out", "rid": rid, "s": stream, "lines": lines})

    # ---- ops

    async def op_ping(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def op_run_code(self, rid: str, frame: dict[str, Any]) -> dict[str, Any] | None:
        code = frame["code"]
        if code.startswith("print:"):
            n = int(code.split(":", 1)[1])
            for i in range(0, n, 10):
                self._out(rid, [f"{j}\n" for j in range(i, min(n, i + 10))])
            return {"ok": True}
        if code.startswith("gate:"):
            gate = self.gate(code.split(":", 1)[1])
            cancel = self.cancels[rid]
            waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(cancel.wait())]
            try:
                finished, _ = await asyncio.wait(waits, timeout=frame.get("timeout_s"), return_when="FIRST_COMPLETED")
            finally:
                for w in waits:
                    w.cancel()
            if cancel.is_set():
                return {"ok": False, "error": {"name": "Cancelled", "message": "the request was cancelled"}}
            if not finished:
                return {"ok": False, "error": {"name": "Timeout", "message": "the code exceeded the timeout"}}
            self._out(rid, ["0\n"])
            return {"ok": True}
        if code == "raise":
            return {"ok": False, "error": {"name": "ZeroDivisionError", "message": "division by zero"}}
        if code == "workerdied":
            return {"ok": False, "error": {"name": "WorkerDied", "message": "the worker died"}, "state_lost": True}
        if code == "die":
            self.die()
            return None
        if code == "hang":
            await asyncio.Event().wait()
        self.emit({"ev": "result", "rid": rid, "data": {"text/plain": code}, "main": True})
        return {"ok": True}

    async def op_exec(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        command = frame["command"]
        if command.startswith("exit "):
            return {"ok": True, "exit_code": int(command.split()[1])}
        self._out(rid, [command + "\n"])
        return {"ok": True, "exit_code": 0}

    async def op_write_file(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        self.files[frame["path"]] = frame["content"]
        return {"ok": True, "bytes": len(frame["content"])}

    async def op_read_file(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        if frame["path"] not in self.files:
            return {"ok": False, "error": {"name": "FileNotFoundError", "message": frame["path"]}}
        return {"ok": True, "content": self.files[frame["path"]], "encoding": "utf-8"}

    async def op_list_files(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "entries": [{"name": n, "type": "file"} for n in sorted(self.files)]}

    async def op_start_process(self, rid: str, frame: dict[str, Any]) -> dict[str, Any]:
        proc = frame["process_id"]

        async def later() -> None:
            await asyncio.sleep(0)
            self.emit({"ev": "pout", "proc": proc, "s": "stdout", "lines": [frame["command"] + "\n"]})
            self.emit({"ev": "pexit", "proc": proc, "exit_code": 0})

        self.running[f"proc-{next(self._procs)}"] = asyncio.get_running_loop().create_task(later())
        return {"ok": True, "process_id": proc}


class FakeBackend:
    """A ``Backend`` (sandbox/base.py) whose sandboxes are fake agents in this process."""

    name = "fake"
    runtime = "none"

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self.started = 0
        self.closed = 0
        self.fail_starts = 0  # the next N starts raise SandboxUnavailable
        self.hold_starts: asyncio.Event | None = None  # when set to an unset Event, starts wait for it

    async def ping(self) -> bool:
        return True

    async def reap_orphans(self) -> int:
        return 0

    async def start(self, session_id: str) -> Sandbox:
        if self.hold_starts is not None:
            await self.hold_starts.wait()
        if self.fail_starts:
            self.fail_starts -= 1
            raise SandboxUnavailable("the fake backend was told to fail")
        self.started += 1
        agent = FakeAgent()
        sid = f"fake-{self.started}"
        self.agents[sid] = agent
        sb = Sandbox(
            sandbox_id=sid,
            session_id=session_id,
            backend=self.name,
            runtime=self.runtime,
            image="fake",
            reader=agent.reader,
            writer=agent.writer,  # type: ignore[arg-type]
            docker_mux=False,
            closer=self._closed,
        )
        await sb.handshake(5.0)
        return sb

    async def _closed(self, sb: Sandbox) -> None:
        self.closed += 1
        agent = self.agents.get(sb.id)
        if agent is not None:
            agent.stop()
            for t in list(agent.running.values()):
                with contextlib.suppress(BaseException):
                    await t

    def agent_of(self, sb: Sandbox) -> FakeAgent:
        return self.agents[sb.id]

    async def close(self) -> None:
        return None
