"""A live session: one sandbox, its requests, and its outbox.

Life cycle (``State``, changed only by ``transition``)::

    STARTING --attach--> ATTACHED <--detach/attach--> DETACHED
        \\                  |                            |
         `---------------> CLOSING --> CLOSED <----------'

- ``attach(conn, last_seq)`` binds a connection (a new one, or a resume that
  takes over an open one) and queues the ``ready`` frame.
- While DETACHED, requests go on running; their frames wait in the outbox and
  producers block at the send-queue limit, so nothing is lost in the grace.
- ``close()`` cancels every request, closes the outbox and releases the sandbox.

Requests: ``handle_frame`` parses one client frame and starts one owned task
per request. Every accepted request ends with exactly one ``done`` frame,
whatever happens (success, error, timeout, cancel, lost sandbox). A sandbox
that dies fails its requests with ``SandboxLost``; the session then gets a new
sandbox from the engine and says so with a ``sandbox_replaced`` frame.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from groundloop.sandbox.base import Sandbox, SandboxError, SandboxLost

from . import logs
from .errors import CLOSE_SESSION_CLOSED, ProtocolError
from .outbox import Outbox
from .protocol import (
    EXECUTIONS,
    Request,
    done_frame,
    error_frame,
    failure,
    output_frame,
    output_frame_parts,
    parse_request,
    ready_frame,
)

if TYPE_CHECKING:
    from .manager import SessionManager

OUTPUT_TAIL = 8 << 10
_STRIP = frozenset({"ev", "rid", "ok", "error", "agent_ms"})


class State(enum.IntEnum):
    STARTING = 0
    ATTACHED = 1
    DETACHED = 2
    CLOSING = 3
    CLOSED = 4


_ALLOWED = {
    State.STARTING: {State.ATTACHED, State.CLOSING},
    State.ATTACHED: {State.ATTACHED, State.DETACHED, State.CLOSING},
    State.DETACHED: {State.ATTACHED, State.CLOSING},
    State.CLOSING: {State.CLOSED},
    State.CLOSED: set(),
}


class SessionClosed(Exception):
    pass


class Cancelled(Exception):
    """A request was cancelled before it reached the sandbox."""


class _Req:
    __slots__ = (
        "req",
        "task",
        "t0",
        "t_sent",
        "agent_rid",
        "sb",
        "cancelled",
        "started",
        "waiting",
        "first_out",
        "finished",
    )

    def __init__(self, req: Request):
        self.req = req
        self.task: asyncio.Task | None = None
        self.t0 = self.t_sent = time.perf_counter()
        self.agent_rid: str | None = None
        self.sb: Sandbox | None = None
        self.cancelled = False
        self.started = False
        self.waiting = False
        self.first_out = False
        self.finished = False


class Session:
    def __init__(self, *, user: str, sandbox: Sandbox, manager: SessionManager):
        self.manager = manager
        self.settings = manager.settings
        self.metrics = manager.metrics
        self.engine = manager.engine
        self.user = user
        self.id = sandbox.session_id
        self.sb = sandbox
        s = self.settings
        self.outbox = Outbox(
            replay_frames=s.replay_frames,
            replay_bytes=s.replay_bytes,
            high=s.send_queue_frames,
            high_bytes=s.send_queue_bytes,
        )
        self.state = State.STARTING
        self.conn: Any = None
        self.inflight: dict[Any, _Req] = {}
        self.procs: dict[str, Any] = {}
        self.created = time.monotonic()
        self.last_activity = self.created
        self.detached_at: float | None = None
        self._rids = itertools.count(1)
        self._waiting = 0  # agent ops whose task waits for a sandbox: later ops queue behind them
        self._tasks: set[asyncio.Task] = set()
        self._sb_ready = asyncio.Event()
        self._sb_ready.set()
        self._replacing: Sandbox | None = None
        self.detached = asyncio.Event()  # set while no connection is attached (tests, introspection)
        self.closed = asyncio.Event()
        self._attach_lock = asyncio.Lock()
        sandbox.set_listener(self._make_listener(sandbox))

    # ---- life cycle

    def transition(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(
                f"session {self.id[:8]}: expected a state in "
                f"{sorted(s.name for s in _ALLOWED[self.state])}, got {new.name}"
            )
        self.state = new

    @property
    def live(self) -> bool:
        return self.state < State.CLOSING

    async def attach(self, conn: Any, last_seq: int | None = None) -> None:
        """Bind ``conn``; queue ``ready`` (after a rewind when resuming). Raises ResumeError."""
        async with self._attach_lock:
            await self._attach(conn, last_seq)

    async def _attach(self, conn: Any, last_seq: int | None) -> None:
        if not self.live:
            raise SessionClosed("the session is closed")
        if last_seq is not None:
            self.outbox.check_rewind(last_seq)  # refuse before the takeover: the session stays untouched
        old = self.conn
        if old is not None and old is not conn:
            self.conn = None
            await old.kick_for_takeover()
        ready = ready_frame(self.id, last_seq is not None, self.sandbox_info(), self.limits())
        if last_seq is None:
            self.outbox.put_nowait(ready)
        else:
            replayed, missed = self.outbox.rewind(last_seq, ready)
            self.metrics.replayed.inc(replayed)
            logs.event("resume", user=self.user, session=self.id, last_seq=last_seq, replayed=replayed, missed=missed)
        self.conn = conn
        self.detached_at = None
        self.detached.clear()
        self.transition(State.ATTACHED)

    def detach(self, conn: Any) -> None:
        """The connection ``conn`` ended; the session waits resume_grace_s for a new one."""
        if self.conn is not conn or not self.live:
            return
        self.conn = None
        self.detached_at = time.monotonic()
        self.transition(State.DETACHED)
        self.detached.set()

    async def close(self, reason: str = "closed", code: int = CLOSE_SESSION_CLOSED) -> None:
        """Cancel every request, tell the client, release the sandbox. Idempotent."""
        if not self.live:
            return
        self.transition(State.CLOSING)
        conn, self.conn = self.conn, None
        tasks = [r.task for r in self.inflight.values() if r.task is not None] + list(self._tasks)
        for t in tasks:
            t.cancel()
        self.outbox.close()
        if conn is not None:
            await conn.close(code, reason)
        await asyncio.gather(*tasks, return_exceptions=True)
        sbs = {self.sb, self._replacing} - {None}
        for sb in sbs:
            try:
                await self.engine.release(sb)
            except Exception as exc:  # pragma: no cover - docker trouble at shutdown
                logs.event("error", logging.WARNING, session=self.id, message=f"release failed: {exc}")
        self.transition(State.CLOSED)
        self.closed.set()
        logs.event("session_closed", user=self.user, session=self.id, reason=reason)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.inflight else now - self.last_activity

    def sandbox_info(self) -> dict[str, Any]:
        sb = self.sb
        return {"backend": sb.backend, "runtime": sb.runtime, "image": sb.image, "warm": sb.warm}

    def limits(self) -> dict[str, Any]:
        s, sb = self.settings, self.settings.sandbox
        return {
            "max_message_bytes": s.max_message_bytes,
            "max_output_bytes": sb.max_output_bytes,
            "exec_timeout_s": sb.exec_timeout_s,
            "max_exec_timeout_s": sb.max_exec_timeout_s,
            "max_file_bytes": sb.max_file_bytes,
            "line_max_bytes": sb.line_max_bytes,
            "max_inflight": s.max_inflight,
            "resume_grace_s": s.resume_grace_s,
            "idle_timeout_s": s.idle_timeout_s,
            "replay_frames": s.replay_frames,
            "max_iterations": s.max_iterations,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "state": self.state.name,
            "inflight": len(self.inflight),
            "outbox": self.outbox.stats(),
        }

    # ---- frames in

    async def emit(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the client (waits while the send queue is full)."""
        await self.outbox.put(frame)

    async def _error(self, code: str, message: str, id: Any = None) -> None:
        self.metrics.errors.labels(code).inc()
        logs.event("error", user=self.user, session=self.id, id=id, code=code, message=message[:200])
        await self.emit(error_frame(code, message, id))

    async def handle_frame(self, data: bytes | str) -> None:
        """One client frame: refuse it with an error frame, or start its request."""
        self.last_activity = time.monotonic()
        try:
            req = parse_request(data, self.settings.max_message_bytes)
        except ProtocolError as exc:
            await self._error(exc.code, exc.message, exc.id)
            if exc.id is not None and exc.id not in self.inflight:
                await self._done_now(exc.id, "bad_request", failure("BadRequest", exc.message))
            return
        if req.id in self.inflight:
            await self._error("bad_request", f"a request with id {req.id!r} is already in flight", req.id)
            return
        if req.type == "cancel":
            found = self.cancel(req.params["target"])
            await self._done_now(req.id, "ok", None, found=found)
            return
        await self.outbox.wait_turn()  # a client that reads nothing is not read either
        limited = self.manager.check_limits(self, req)
        if limited is not None:
            await self._error(limited.code, limited.message, req.id)
            await self._done_now(req.id, limited.code, failure(limited.name, limited.message))
            return
        r = _Req(req)
        self.inflight[req.id] = r
        self.metrics.inflight.inc()
        if req.type == "ping":  # no task: answered in place
            self.outbox.put_nowait({"type": "pong", "id": req.id})
            self._finish(r, True, "ok", None, {})
            return
        if not hasattr(self, "_op_" + req.type):  # an agent op
            if not self._waiting and self._sb_ready.is_set():
                self._submit(r, self.sb)  # no task: the sandbox reader queues its done
                return
            r.waiting = True
            self._waiting += 1
        r.task = asyncio.create_task(self._run(r), name=f"req-{self.id[:8]}-{req.type}")

    async def _done_now(self, id: Any, outcome: str, error: dict | None, **extra: Any) -> None:
        self.metrics.requests.labels("rejected" if error else "cancel", outcome).inc()
        await self.emit(done_frame(id, error is None, 0.0, error, **extra))

    def cancel(self, target: Any) -> bool:
        """Cancel request ``target``: it ends with ``done`` ok:false ``Cancelled``."""
        r = self.inflight.get(target)
        if r is None:
            return False
        r.cancelled = True
        if not r.started:
            return True  # _run sees the flag first thing
        if r.agent_rid is not None and r.sb is not None and r.req.type != "assist":
            r.sb.cancel(r.agent_rid)
        elif r.task is not None:
            r.task.cancel()
        return True

    # ---- running requests

    async def _run(self, r: _Req) -> None:
        req = r.req
        ok, outcome, error, extra = False, "error", None, {}
        try:
            r.started = True
            if r.cancelled:
                raise Cancelled()
            handler = getattr(self, "_op_" + req.type, None) or self._op_sandbox
            result = await handler(r)
            if r.finished:
                return  # its done left as soon as the sandbox gave it
            ok = bool(result.pop("ok", True))
            error = result.pop("error", None)
            extra = result
            outcome = "ok" if ok else _outcome(error)
        except asyncio.CancelledError:
            t = asyncio.current_task()
            if t is not None and t.cancelling():
                t.uncancel()
            outcome, error = self._failed(r, Cancelled())
        except Exception as exc:
            outcome, error = self._failed(r, exc)
        self._finish(r, ok, outcome, error, extra)

    def _submit(self, r: _Req, sb: Sandbox) -> None:
        """Start a sandbox op from the frame handler, with no task: the sandbox reader
        queues its done (on_done), and a failure (the sandbox lost) ends it from the future."""
        r.started = True
        op, params, deadline = self._agent_params(r)
        try:
            fut = self._send(r, sb, op, params, deadline, {}, finish=True)
        except Exception as exc:
            self._finish(r, False, *self._failed(r, exc), {})
            return

        def ended(fut: asyncio.Future) -> None:
            r.agent_rid = None
            exc = Cancelled() if fut.cancelled() else fut.exception()
            if exc is not None:
                if not self.live:  # the sandbox went with the session
                    exc = Cancelled()
                self._finish(r, False, *self._failed(r, exc), {})

        fut.add_done_callback(ended)

    def _failed(self, r: _Req, exc: BaseException) -> tuple[str, dict[str, Any]]:
        """(outcome, error) of a request that ended with ``exc``; a lost sandbox starts its replacement."""
        if isinstance(exc, Cancelled):
            return "cancelled", failure("Cancelled", "the request was cancelled")
        if isinstance(exc, SandboxError):
            if isinstance(exc, SandboxLost):
                self._sandbox_lost(r.sb or self.sb, str(exc))
                return "lost", failure(exc.name, str(exc))
            return "unavailable", failure(exc.name, str(exc))
        # a server bug must still end the request
        logs.log.error("request %s failed", r.req.type, exc_info=exc)
        self.metrics.errors.labels("internal").inc()
        return "internal", failure("InternalError", f"{type(exc).__name__}: {exc}")

    def _finish(self, r: _Req, ok: bool, outcome: str, error: dict | None, extra: dict[str, Any]) -> None:
        """The request's one done: accounted, logged and queued (past the high water mark:
        a done is never held back behind output, and there is one per request in flight)."""
        if r.finished:
            return
        r.finished = True
        self._submitted(r)  # or never will be
        req = r.req
        self.inflight.pop(req.id, None)
        self.metrics.inflight.dec()
        self.last_activity = time.monotonic()
        seconds = time.perf_counter() - r.t0
        self.metrics.request_done(req.type, outcome, seconds)
        if extra.get("truncated"):
            self.metrics.truncations.inc()
        if req.type in EXECUTIONS:
            self._audit(r, outcome, seconds)
        if error is not None:
            ok = False
            if outcome in ("lost", "unavailable"):
                self.metrics.errors.labels("sandbox_unavailable").inc()
        logs.event(
            "request",
            user=self.user,
            session=self.id,
            id=req.id,
            type=req.type,
            outcome=outcome,
            duration_ms=round(seconds * 1000, 3),
            error=error.get("name") if error else None,
        )
        try:
            self.outbox.put_nowait(done_frame(req.id, ok, seconds * 1000, error, **extra))
        except ConnectionError:
            pass  # the session closed under the request

    def _audit(self, r: _Req, outcome: str, seconds: float) -> None:
        p = r.req.params
        text = p.get("code") or p.get("command") or p.get("prompt") or ""
        logs.audit(
            user=self.user,
            session=self.id,
            type=r.req.type,
            text=text,
            outcome=outcome,
            duration_ms=seconds * 1000,
            language=p.get("language"),
        )

    async def sandbox(self) -> Sandbox:
        """The current sandbox, waiting out a replacement."""
        await self._sb_ready.wait()
        if not self.live:
            raise SessionClosed("the session is closed")
        return self.sb

    def _timeout(self, r: _Req) -> float:
        sb = self.settings.sandbox
        t = r.req.params.get("timeout_s") or sb.exec_timeout_s
        return float(min(t, sb.max_exec_timeout_s))

    def _agent_params(self, r: _Req) -> tuple[str, dict[str, Any], float]:
        """(op, params, deadline_s) for a request that the agent runs."""
        req, sb = r.req, self.settings.sandbox
        p = dict(req.params)
        op = req.type
        deadline = max(sb.exec_timeout_s, 30.0) + 10
        if op in ("run_code", "exec"):
            p["timeout_s"] = self._timeout(r)
            p["max_output_bytes"] = sb.max_output_bytes
            deadline = p["timeout_s"] + 10
            if op == "run_code":
                p.setdefault("language", "python")
        elif op in ("write_file", "read_file"):
            p["max_file_bytes"] = sb.max_file_bytes
        elif op == "start_process":
            p.setdefault("process_id", f"proc-{next(self._rids)}")
            self.procs[p["process_id"]] = req.id
        elif op == "create_context":
            p.setdefault("language", "python")
        elif op == "list_files":
            p.setdefault("path", ".")
        return op, p, deadline

    async def _op_sandbox(self, r: _Req) -> dict[str, Any]:
        op, params, deadline = self._agent_params(r)
        done = await self._agent_request(r, op, params, deadline, {}, finish=True)
        return _done_fields(done)

    async def _agent_request(
        self,
        r: _Req,
        op: str,
        params: dict[str, Any],
        deadline: float,
        tags: dict[str, Any],
        tail: list[str] | None = None,
        finish: bool = False,
    ) -> dict[str, Any]:
        """Run one agent op for request ``r``, streaming its frames; returns the agent's done.

        With ``finish``, the client's done is queued by the sandbox reader as the agent's
        done arrives, in the same turn of the loop as the request's last output, so both
        usually leave in one write.
        """
        sb = await self.sandbox()
        if r.cancelled:
            raise Cancelled()
        fut = self._send(r, sb, op, params, deadline, tags, tail, finish)
        rid = r.agent_rid
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
            else:
                fut.exception() if not fut.cancelled() else None
            raise
        finally:
            r.agent_rid = None
        if not finish:
            self._observe(r, op, params, done)  # with finish, on_done did (a done always passes through it first)
        return done

    def _send(
        self,
        r: _Req,
        sb: Sandbox,
        op: str,
        params: dict[str, Any],
        deadline: float,
        tags: dict[str, Any],
        tail: list[str] | None = None,
        finish: bool = False,
    ) -> asyncio.Future:
        """Submit one agent op for ``r`` to ``sb``; the future gets the agent's done."""
        self._submitted(r)
        rid = f"{r.req.type}-{next(self._rids)}"
        on_event = self._streamer(r, tags, tail)
        r.t_sent = time.perf_counter()

        def on_done(done: dict[str, Any]) -> None:
            self._observe(r, op, params, done)
            result = _done_fields(done)
            ok = bool(result.pop("ok", True))
            error = result.pop("error", None)
            self._finish(r, ok, "ok" if ok else _outcome(error), error, result)

        fut = sb.submit(op, params, on_event, rid=rid, deadline_s=deadline, on_done=on_done if finish else None)
        r.sb, r.agent_rid = sb, rid
        return fut

    def _submitted(self, r: _Req) -> None:
        if r.waiting:
            r.waiting = False
            self._waiting -= 1

    def _observe(self, r: _Req, op: str, params: dict[str, Any], done: dict[str, Any]) -> None:
        """The execution-time metric of one run_code or exec."""
        if op in ("run_code", "exec"):
            outcome = "ok" if done.get("ok") else _outcome(done.get("error"))
            language = params.get("language", "python") if op == "run_code" else "shell"
            self.metrics.execution_done(op, language, outcome, time.perf_counter() - r.t_sent)

    def _streamer(self, r: _Req, tags: dict[str, Any], tail: list[str] | None):
        rid = r.req.id
        outbox = self.outbox
        put = outbox.put
        metrics = self.metrics
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
                if not r.first_out:
                    r.first_out = True
                    metrics.first_output.labels(kind).observe(time.perf_counter() - r.t0)
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
            elif what == "result":
                await put(
                    {"type": "result", "id": rid, "data": ev.get("data", {}), "main": bool(ev.get("main")), **tags}
                )

        return on_event

    async def _op_assist(self, r: _Req) -> dict[str, Any]:
        runner = self.manager.assist
        if runner is None or not getattr(runner, "available", False):
            msg = "assist needs a model: set ANTHROPIC_API_KEY in the server's environment"
            await self._error("llm_unavailable", msg, r.req.id)
            return {"ok": False, "error": failure("LLMUnavailable", msg)}
        p = r.req.params
        language = p.get("language", "python")
        context = p.get("context")

        async def emit(frame: dict[str, Any]) -> None:
            frame.setdefault("id", r.req.id)
            await self.outbox.put(frame)

        async def execute(code: str, language: str = language, iteration: int = 1) -> dict[str, Any]:
            params: dict[str, Any] = {
                "code": code,
                "language": language or "python",
                "timeout_s": self._timeout(r),
                "max_output_bytes": self.settings.sandbox.max_output_bytes,
            }
            if context:
                params["context"] = context
            tail: list[str] = []
            t0 = time.perf_counter()
            done = await self._agent_request(
                r, "run_code", params, params["timeout_s"] + 10, {"iteration": iteration}, tail
            )
            out = {
                "ok": bool(done.get("ok")),
                "output": _tail(tail),
                "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
            }
            if done.get("error"):
                out["error"] = done["error"]
            if done.get("truncated"):
                out["truncated"] = True
            return out

        max_it = min(p.get("max_iterations", 3), self.settings.max_iterations)
        try:
            result = await runner.run(
                rid=r.req.id,
                prompt=p["prompt"],
                language=language,
                max_iterations=max_it,
                context=context,
                emit=emit,
                execute=execute,
                scope=self.user,
            )
        except Exception as exc:
            if getattr(exc, "code", None) != "llm_unavailable":
                raise
            await self._error("llm_unavailable", str(exc), r.req.id)
            return {"ok": False, "error": failure("LLMUnavailable", str(exc))}
        return dict(result)

    # ---- sandbox events

    def _make_listener(self, sb: Sandbox):
        async def listener(ev: dict[str, Any]) -> None:
            what = ev.get("ev")
            if what == "pout":
                proc = ev.get("proc")
                rid = self.procs.get(proc, proc)
                stream = ev.get("s", "stdout")
                for line in ev.get("lines", ()):
                    await self.outbox.put(output_frame(stream, rid, line, process_id=proc))
            elif what == "pexit":
                proc = ev.get("proc")
                rid = self.procs.get(proc, proc)
                await self.outbox.put({"type": "exit", "id": rid, "process_id": proc, "exit_code": ev.get("exit_code")})
            elif what == "lost":
                self._sandbox_lost(sb, ev.get("reason") or "the sandbox died")
            elif what == "log":
                logs.event("sandbox_log", session=self.id, message=ev.get("message"))

        async def guarded(ev: dict[str, Any]) -> None:
            try:
                await listener(ev)
            except ConnectionError:
                pass  # session closed

        return guarded

    def _sandbox_lost(self, sb: Sandbox, reason: str) -> None:
        """Start replacing ``sb`` once, if it is still this session's sandbox."""
        if sb is not self.sb or (sb.alive and not sb.lost_reason) or not self.live or not self._sb_ready.is_set():
            return
        self._sb_ready.clear()
        t = asyncio.create_task(self._replace(sb, reason), name=f"replace-{self.id[:8]}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _replace(self, old: Sandbox, reason: str) -> None:
        logs.event("sandbox_lost", logging.WARNING, user=self.user, session=self.id, reason=reason)
        self._replacing = old
        try:
            new = await self.engine.replace(old)
        except SandboxError as exc:
            self._replacing = None
            await self._error("sandbox_unavailable", f"the sandbox died and could not be replaced: {exc}")
            t = asyncio.create_task(self.manager.close_session(self, "sandbox_unavailable"))
            self.manager.own(t)
            return
        except asyncio.CancelledError:
            self._replacing = None
            raise
        self._replacing = None
        if not self.live:
            await self.engine.release(new)
            return
        new.set_listener(self._make_listener(new))
        self.sb = new
        self.procs.clear()
        self._sb_ready.set()
        await self.emit(
            {
                "type": "sandbox_replaced",
                "session_id": self.id,
                "state_lost": True,
                "reason": reason,
                "sandbox": self.sandbox_info(),
                "message": "the sandbox died and was replaced: code contexts, files and processes are lost",
            }
        )


def _outcome(error: dict | None) -> str:
    name = (error or {}).get("name", "")
    return {"Timeout": "timeout", "Cancelled": "cancelled", "SandboxLost": "lost"}.get(name, "error")


def _done_fields(done: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in done.items() if k not in _STRIP}
    out["ok"] = bool(done.get("ok"))
    if done.get("error"):
        out["error"] = done["error"]
    return out


def _tail(lines: list[str]) -> str:
    text = "".join(lines)
    if len(text) > OUTPUT_TAIL:
        text = text[-OUTPUT_TAIL:]
    return text
