"""The agent path of a session: one request's op sent to the sandbox, its output streamed to the outbox.

``AgentOps`` belongs to one ``Session``. Two ways in:

- ``submit(r, sb)``: from the frame handler, with no task (the fast path of
  every sandbox op when the sandbox is ready and no op queues before it). The
  sandbox reader queues the client's ``done`` as the agent's done arrives
  (``on_done``), in the same turn of the loop as the request's last output, so
  both usually leave in one write; a failure (the sandbox lost) ends the
  request from the future's callback.
- ``request(r, ...)``: from a request's task (an op that waited for a sandbox,
  and each execution of ``assist``); returns the agent's done. Cancelling the
  task cancels the agent's op and waits for its done.

Output: the agent's ``out`` events become ``stdout``/``stderr`` frames, one per
line, each request's frame serialized once around its lines
(``output_frame_parts``); ``result`` events become ``result`` frames. Lines are
put only while the outbox has room: a full send queue makes the sandbox reader
wait, which stops the agent (the backpressure of sessions/outbox.py). Extra
``tags`` (assist's ``iteration``) go on every frame.

Metrics: the first output of a request (``first_output_seen``, by request
type), and the execution time of each run_code and exec (``execution_done``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, MutableSequence
from typing import TYPE_CHECKING, Any

import orjson
from groundloop.sandbox.base import Sandbox

from .inflight import Cancelled, InFlight, ReqState, done_fields, outcome_of
from .protocol import output_frame_parts
from .terminals import TERMINAL_OPS, terminal_output_frame, terminal_params
from .transfers import OPS as TRANSFER_OPS
from .transfers import frames_of, prepare

if TYPE_CHECKING:
    from .session import Session

EXECUTION_OPS = ("run_code", "exec")
ENV_OPS = frozenset({"run_code", "exec", "start_process", "create_context", "open_terminal"})


class AgentOps:
    def __init__(self, session: Session):
        self.session = session
        self._rids = itertools.count(1)

    def timeout(self, r: InFlight) -> float:
        """The request's execution timeout: its own ``timeout_s``, capped, or the default."""
        sb = self.session.settings.sandbox
        t = r.req.params.get("timeout_s") or sb.exec_timeout_s
        return float(min(t, sb.max_exec_timeout_s))

    def params(self, r: InFlight) -> tuple[str, dict[str, Any], float | None]:
        """(op, params, deadline_s) for a request that the agent runs."""
        req, sb = r.req, self.session.settings.sandbox
        p = dict(req.params)
        op = req.type
        deadline: float | None = max(sb.exec_timeout_s, 30.0) + 10
        if op in EXECUTION_OPS:
            p["timeout_s"] = self.timeout(r)
            p["max_output_bytes"] = sb.max_output_bytes
            deadline = p["timeout_s"] + 10
            if op == "run_code" and "context" not in p:  # a named context runs its own language
                p.setdefault("language", "python")
        elif op in ("write_file", "read_file"):
            p["max_file_bytes"] = sb.max_file_bytes
        elif op == "start_process":
            p.setdefault("process_id", f"proc-{next(self._rids)}")
            self.session.procs[p["process_id"]] = req.id
        elif op == "create_context":
            p.setdefault("language", "python")
        elif op == "list_files":
            p.setdefault("path", ".")
        elif op in TERMINAL_OPS:
            deadline = terminal_params(op, req.id, p, sb)
        elif op in TRANSFER_OPS:  # watch_files and the chunked transfers: sessions/transfers.py
            return op, p, prepare(req, p, sb, self.session.requests, deadline)
        return op, p, deadline

    def submit(self, r: InFlight, sb: Sandbox) -> None:
        """Start ``r``'s op with no task: the sandbox reader queues its done (on_done), and a
        failure (the sandbox lost) ends it from the future."""
        session = self.session
        r.transition(ReqState.RUNNING)
        try:
            op, params, deadline = self.params(r)
            fut = self.send(r, sb, op, params, deadline, {}, finish=True)
        except Exception as exc:
            session.finish(r, False, *session.failed(r, exc), {})
            return

        def ended(fut: asyncio.Future[dict[str, Any]]) -> None:
            r.agent_rid = None
            exc: BaseException | None = Cancelled() if fut.cancelled() else fut.exception()
            if exc is not None:
                if not session.live:  # the sandbox went with the session
                    exc = Cancelled()
                session.finish(r, False, *session.failed(r, exc), {})

        fut.add_done_callback(ended)

    async def run(self, r: InFlight) -> dict[str, Any]:
        """The handler of a sandbox op that runs in a task; the client's done is queued by on_done."""
        # Parameters once the sandbox is there: an upload_chunk queued behind its upload_file needs the agent
        # rid that the upload gets when it is sent (sessions/transfers.py), and the upload's task goes first.
        await self.session.sandbox()
        op, params, deadline = self.params(r)
        done = await self.request(r, op, params, deadline, {}, finish=True)
        return done_fields(done)

    async def request(
        self,
        r: InFlight,
        op: str,
        params: dict[str, Any],
        deadline: float | None,
        tags: dict[str, Any],
        tail: MutableSequence[str] | None = None,
        finish: bool = False,
    ) -> dict[str, Any]:
        """Run one agent op for request ``r``, streaming its frames; returns the agent's done.

        With ``finish``, the client's done is queued by the sandbox reader as the agent's
        done arrives, in the same turn of the loop as the request's last output, so both
        usually leave in one write.
        """
        sb = await self.session.sandbox()
        if r.cancelling:
            raise Cancelled()
        fut = self.send(r, sb, op, params, deadline, tags, tail, finish)
        rid = r.agent_rid
        assert rid is not None
        try:
            await sb.drain()
            done = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The request's task was cancelled (assist): stop the sandbox work and wait for it.
            for wait in (0.5, deadline):
                sb.cancel(rid)
                finished, _ = await asyncio.wait([fut], timeout=wait)
                if finished:
                    break
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: the caller is gone
            raise
        finally:
            r.agent_rid = None
        if not finish:
            self.observe(r, op, params, done)  # with finish, on_done did (a done always passes through it first)
        return done

    def send(
        self,
        r: InFlight,
        sb: Sandbox,
        op: str,
        params: dict[str, Any],
        deadline: float | None,
        tags: dict[str, Any],
        tail: MutableSequence[str] | None = None,
        finish: bool = False,
    ) -> asyncio.Future[dict[str, Any]]:
        """Submit one agent op for ``r`` to ``sb``; the future gets the agent's done."""
        session = self.session
        session.requests.unqueue(r)
        if session.env and op in ENV_OPS:  # the request's own env wins over the session's
            own = params.get("env") or {}
            params = {**params, "env": {**session.env, **own}}
            if op == "create_context":
                # Which of the context's names are the session's: a later set_env that drops one drops it from
                # this context too (the agent's Context.run_env). An agent that does not know the field merges.
                params["session_names"] = sorted(set(session.env) - set(own))
        rid = f"{r.req.type}-{next(self._rids)}"
        on_event = self.streamer(r, tags, tail)
        r.t_sent = time.perf_counter()

        def on_done(done: dict[str, Any]) -> None:
            self.observe(r, op, params, done)
            result = done_fields(done)
            ok = bool(result.pop("ok", True))
            error = result.pop("error", None)
            session.finish(r, ok, outcome_of(done), error, result)

        fut = sb.submit(op, params, on_event, rid=rid, deadline_s=deadline, on_done=on_done if finish else None)
        r.sb, r.agent_rid = sb, rid
        return fut

    def observe(self, r: InFlight, op: str, params: dict[str, Any], done: dict[str, Any]) -> None:
        """The execution-time metric of one run_code or exec."""
        if op in EXECUTION_OPS:
            language = params.get("language", "python") if op == "run_code" else "shell"
            self.session.metrics.execution_done(op, language, outcome_of(done), time.perf_counter() - r.t_sent)

    def streamer(
        self, r: InFlight, tags: dict[str, Any], tail: MutableSequence[str] | None
    ) -> Callable[[dict[str, Any]], Awaitable[None]]:
        """The agent-event callback of one op of ``r``: its frames into the outbox."""
        rid = r.req.id
        outbox = self.session.outbox
        put = outbox.put
        metrics = self.session.metrics
        kind = r.req.type
        parts: dict[str, tuple[bytes, bytes]] = {}  # a line's frame around it, by stream, made at its first line

        async def on_event(ev: dict[str, Any]) -> None:
            try:
                await deliver(ev)
            except ConnectionError:
                pass  # the session closed: the request is being cancelled

        async def deliver(ev: dict[str, Any]) -> None:
            what = ev.get("ev")
            if what == "out":
                if not r.first_output:
                    r.first_output = True
                    metrics.first_output_seen(kind, time.perf_counter() - r.t0)
                stream = ev.get("s", "stdout")
                lines = ev.get("lines") or ()
                if tail is not None:
                    tail.extend(lines)
                around = parts.get(stream)
                if around is None:
                    around = parts[stream] = output_frame_parts(stream, rid, **tags)
                before, after = around
                dumps = orjson.dumps
                i = 0
                while i < len(lines):
                    space = outbox.space
                    if space <= 0:
                        await outbox.wait_room()
                        continue
                    outbox.put_encoded_many([before + dumps(line) + after for line in lines[i : i + space]])
                    i += space
            elif what == "tout":
                await put(terminal_output_frame(rid, ev.get("data", "")))
            elif what == "result":
                frame = {"type": "result", "id": rid, "data": ev.get("data", {}), "main": bool(ev.get("main"))}
                display_id = ev.get("display_id")
                if isinstance(display_id, str) and display_id:
                    frame["display_id"] = display_id
                    if ev.get("update"):
                        frame["update"] = True
                await put({**frame, **tags})
            elif what == "clear":
                await put({"type": "clear_output", "id": rid, "wait": bool(ev.get("wait")), **tags})
            else:
                for frame in frames_of(ev, rid):
                    await put(frame)

        return on_event
