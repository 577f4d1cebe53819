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

Requests: ``handle_frame`` parses one client frame, refuses it (an error
frame, and a ``done`` when its id could be read), or enters it in the request
table (sessions/inflight.py, one state per request) and starts it through a
table of request type -> starter:

- ``cancel`` is answered in place, before the limits, and never in flight;
- ``ping`` is answered in place;
- a sandbox op goes to the agent at once, with no task (sessions/streaming.py),
  unless the sandbox is being replaced or an earlier op waits for it: then it
  gets a task that waits its turn;
- ``assist`` runs in a task of its own (sessions/assist_adapter.py).

Every accepted request ends with exactly one ``done`` frame (``finish``),
whatever happens (success, error, timeout, cancel, lost sandbox). A sandbox
that dies fails its requests with ``SandboxLost``; the session then gets a new
sandbox from the engine and says so with a ``sandbox_replaced`` frame.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from groundloop.sandbox.base import EventHandler, Sandbox, SandboxError, SandboxLost

from . import logs
from .assist_adapter import run_assist
from .egress import SessionEgress
from .errors import CLOSE_NORMAL, CLOSE_SESSION_CLOSED, ProtocolError
from .inflight import Cancelled, InFlight, ReqState, RequestTable, outcome_of
from .outbox import Outbox
from .protocol import (
    EXECUTIONS,
    REQUEST_TYPES,
    Request,
    done_frame,
    error_frame,
    failure,
    features,
    output_frame,
    parse_request,
    ready_frame,
)
from .seams import Conn
from .streaming import AgentOps
from .transfers import RequestFailed
from .workspace_ops import WORKSPACE_REQUESTS, run_workspace_request

if TYPE_CHECKING:
    from .manager import SessionManager


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


Handler = Callable[[InFlight], Awaitable[dict[str, Any]]]
# Every request type but cancel (answered in place) that is neither answered in place
# (ping, set_env) nor run by a handler of its own (assist, close_session, the workspace requests) is an op of
# the sandbox agent.
SESSION_REQUESTS = frozenset({"cancel", "ping", "assist", "set_env", "close_session"})
AGENT_OPS = REQUEST_TYPES - SESSION_REQUESTS - WORKSPACE_REQUESTS
CLOSE_FLUSH_S = 5.0
"""How long close_session waits for the requests it cancels, and then for its done to reach the client."""


class Session:
    def __init__(self, *, user: str, sandbox: Sandbox, manager: SessionManager, egress: list[str] | None = None):
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
        self.conn: Conn | None = None
        self.requests = RequestTable()
        self.ops = AgentOps(self)
        self.procs: dict[Any, Any] = {}  # process id -> the id of the request that started it
        self.workspace: str | None = None  # the named workspace at /workspace (set by the manager)
        # The session's environment (set_env): under every context, run, exec and process. Its values are
        # never logged, counted or audited.
        self.env: dict[str, str] = {}
        self.created = time.monotonic()
        self.last_activity = self.created
        self.detached_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sb_ready = asyncio.Event()
        self._sb_ready.set()
        self._replacing: Sandbox | None = None
        self.detached = asyncio.Event()  # set while no connection is attached (tests, introspection)
        self.closed = asyncio.Event()
        self._attach_lock = asyncio.Lock()
        # How each request type starts (cancel never gets here); see handle_frame.
        self._start: dict[str, Callable[[InFlight], None]] = dict.fromkeys(AGENT_OPS, self._start_agent_op)
        self._start["ping"] = self._answer_ping
        self._start["assist"] = self._start_assist
        for kind in WORKSPACE_REQUESTS:
            self._start[kind] = lambda r: self._start_task(r, partial(run_workspace_request, self))
        self._start["set_env"] = self._set_env
        self._start["close_session"] = partial(self._start_task, handler=self._close_by_client)
        sandbox.set_listener(self._make_listener(sandbox))
        self.egress = SessionEgress(
            user=user, session=self.id, sandbox_settings=s.sandbox, metrics=self.metrics, narrow=egress
        )
        self.egress.bind(sandbox)

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

    @property
    def inflight(self) -> RequestTable:
        """The requests in flight (an alias of ``requests``: tests and introspection read it)."""
        return self.requests

    async def attach(self, conn: Conn, last_seq: int | None = None) -> None:
        """Bind ``conn``; queue ``ready`` (after a rewind when resuming). Raises ResumeError."""
        async with self._attach_lock:
            await self._attach(conn, last_seq)

    async def _attach(self, conn: Conn, last_seq: int | None) -> None:
        if not self.live:
            raise SessionClosed("the session is closed")
        if last_seq is not None:
            self.outbox.check_rewind(last_seq)  # refuse before the takeover: the session stays untouched
        old = self.conn
        if old is not None and old is not conn:
            self.conn = None
            await old.kick_for_takeover()  # up to CLOSE_WAIT_S against a dead peer
            if not self.live:  # the reaper or the drain closed the session meanwhile
                raise SessionClosed("the session is closed")
        ready = ready_frame(
            self.id,
            last_seq is not None,
            self.sandbox_info(),
            self.limits(),
            features=features(getattr(self.sb, "hello", {}).get("languages")),
        )
        if last_seq is None:
            self.outbox.put_nowait(ready)
        else:
            replayed, missed = self.outbox.rewind(last_seq, ready)
            self.metrics.frames_replayed(replayed)
            logs.event("resume", user=self.user, session=self.id, last_seq=last_seq, replayed=replayed, missed=missed)
        self.conn = conn
        self.detached_at = None
        self.detached.clear()
        self.transition(State.ATTACHED)

    def detach(self, conn: Conn) -> None:
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
        tasks = [r.task for r in self.requests.values() if r.task is not None] + list(self._tasks)
        for t in tasks:
            t.cancel()
        self.outbox.close()
        if conn is not None:
            await conn.close(code, reason)
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in self.requests.values():  # a task cancelled before its first step never reached finish
            self.finish(r, False, *self.failed(r, Cancelled()), {})
        sbs = {sb for sb in (self.sb, self._replacing) if sb is not None}
        for sb in sbs:
            try:
                await self.engine.release(sb)
            except Exception as exc:  # pragma: no cover - docker trouble at shutdown
                logs.event("error", logging.WARNING, session=self.id, message=f"release failed: {exc}")
        self.transition(State.CLOSED)
        self.closed.set()
        logs.event("session_closed", user=self.user, session=self.id, reason=reason)

    def idle_for(self, now: float) -> float:
        # A watch_files waits for events as long as the session lives: it does not keep the session busy.
        busy = any(r.req.type != "watch_files" for r in self.requests.values())
        return 0.0 if busy else now - self.last_activity

    def sandbox_info(self) -> dict[str, Any]:
        sb = self.sb
        info = {
            "backend": sb.backend,
            "runtime": sb.runtime,
            "image": sb.image,
            "warm": sb.warm,
            "channel": sb.channel,
            # the server's gate, the agent's proxy (its hello), and a list that allows something
            "egress": getattr(sb, "egress", None) is not None
            and bool(sb.hello.get("egress"))
            and self.egress.describe()["enabled"],
        }
        if self.workspace is not None:
            info["workspace"] = self.workspace
        return info

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
            "transfer_chunk_bytes": sb.transfer_chunk_bytes,
            "max_terminals": sb.max_terminals,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "state": self.state.name,
            "inflight": len(self.requests),
            "outbox": self.outbox.stats(),
        }

    # ---- frames in

    async def emit(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the client (waits while the send queue is full)."""
        await self.outbox.put(frame)

    async def error(self, code: str, message: str, id: Any = None) -> None:
        """An error frame to the client, counted and logged."""
        self.metrics.error(code)
        logs.event("error", user=self.user, session=self.id, id=id, code=code, message=message[:200])
        await self.emit(error_frame(code, message, id))

    async def handle_frame(self, data: bytes | str, conn: Conn | None = None) -> None:
        """One client frame: refuse it with an error frame, or start its request.

        ``conn`` is the connection that read it (None: not read from a socket, as in tests). A frame
        whose connection is no longer the attached one when its turn comes is dropped: that
        connection was taken over or closed while the frame waited, and its client resends
        what got no answer on the connection it resumes with.
        """
        self.last_activity = time.monotonic()
        try:
            req = parse_request(data, self.settings.max_message_bytes)
        except ProtocolError as exc:
            await self.error(exc.code, exc.message, exc.id)
            if exc.id is not None and exc.id not in self.requests:
                await self._done_now(exc.id, "bad_request", failure("BadRequest", exc.message))
            return
        if await self._refused_as_duplicate(req):
            return
        if req.type == "cancel":  # a control request: answered in place, never in flight or limited
            found = self.cancel(req.params["target"])
            await self._done_now(req.id, "ok", None, found=found)
            return
        await self.outbox.wait_turn()  # a client that reads nothing is not read either
        # The wait can be long: the checks above are stale. A resume can have taken over the
        # connection of this frame, and its resend of the same id can have been waiting here too.
        if conn is not None and self.conn is not conn:
            logs.event("frame_dropped", user=self.user, session=self.id, id=req.id, reason="connection replaced")
            return
        if await self._refused_as_duplicate(req):
            return
        limited = self.manager.check_limits(self, req)
        if limited is not None:
            await self.error(limited.code, limited.message, req.id)
            await self._done_now(req.id, limited.code, failure(limited.name, limited.message))
            return
        r = self.requests.add(req)
        self.metrics.inflight.inc()
        self._start[req.type](r)

    async def _refused_as_duplicate(self, req: Request) -> bool:
        """An id still in flight: the error frame only (the done of that id belongs to the first request)."""
        if req.id not in self.requests:
            return False
        await self.error("bad_request", f"a request with id {req.id!r} is already in flight", req.id)
        return True

    def _answer_ping(self, r: InFlight) -> None:
        """No task: answered in place."""
        self.outbox.put_nowait({"type": "pong", "id": r.req.id})
        self.finish(r, True, "ok", None, {})

    def _set_env(self, r: InFlight) -> None:
        """No task: answered in place. The done names the variables, never their values."""
        p = r.req.params
        self.env = dict(p["env"]) if p.get("replace") else {**self.env, **p["env"]}
        self.finish(r, True, "ok", None, {"names": sorted(self.env)})

    async def _close_by_client(self, r: InFlight) -> dict[str, Any]:
        """close_session: the other requests end (Cancelled) first, this done last, then the session
        closes at once (1000), its sandbox removed: no resume grace."""
        others = [x.req.id for x in self.requests.values() if x is not r]
        for rid in others:
            self.cancel(rid)
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_FLUSH_S
        # Polled, like the drain (server/drain.py): neither the request table nor the outbox has an event for
        # "emptied", and this runs once per session.
        while any(rid in self.requests for rid in others) and loop.time() < until:
            await asyncio.sleep(0.01)
        self.manager.own(asyncio.create_task(self._close_after(r.req.id), name=f"close-{self.id[:8]}"))
        return {}

    async def _close_after(self, rid: Any) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_FLUSH_S
        # Until its done has left (or no client is there to read it).
        while (rid in self.requests or self.outbox.unsent) and self.conn is not None and loop.time() < until:
            await asyncio.sleep(0.01)
        logs.event("session_close_requested", user=self.user, session=self.id)
        await self.manager.close_session(self, "closed by the client", CLOSE_NORMAL)

    def _start_agent_op(self, r: InFlight) -> None:
        if not self.requests.queued and self._sb_ready.is_set():
            self.ops.submit(r, self.sb)  # no task: the sandbox reader queues its done
            return
        self.requests.queue(r)  # later ops queue behind this one
        self._start_task(r, self.ops.run)

    def _start_assist(self, r: InFlight) -> None:
        self._start_task(r, partial(run_assist, self))

    def _start_task(self, r: InFlight, handler: Handler) -> None:
        r.task = asyncio.create_task(self._run(r, handler), name=f"req-{self.id[:8]}-{r.req.type}")

    async def _done_now(self, id: Any, outcome: str, error: dict | None, **extra: Any) -> None:
        """The done of a request that never entered the table (refused, or a cancel)."""
        self.metrics.request_answered("rejected" if error else "cancel", outcome)
        await self.emit(done_frame(id, error is None, 0.0, error, **extra))

    def cancel(self, target: Any) -> bool:
        """Cancel request ``target``: it ends with ``done`` ok:false ``Cancelled``."""
        r = self.requests.get(target)
        if r is None:
            return False
        if r.state is not ReqState.RUNNING:
            if r.state is ReqState.NEW:
                r.transition(ReqState.CANCELLING)  # its task sees this first thing
            return True
        r.transition(ReqState.CANCELLING)
        if r.agent_rid is not None and r.sb is not None and r.req.type != "assist":
            r.sb.cancel(r.agent_rid)
        elif r.task is not None:
            r.task.cancel()
        return True

    # ---- running requests

    async def _run(self, r: InFlight, handler: Handler) -> None:
        ok, outcome, error, extra = False, "error", None, {}
        try:
            if r.cancelling:
                raise Cancelled()
            r.transition(ReqState.RUNNING)
            result = await handler(r)
            if r.done:
                return  # its done left as soon as the sandbox gave it
            result.setdefault("ok", True)
            outcome = outcome_of(result)
            ok = bool(result.pop("ok"))
            error = result.pop("error", None)
            extra = result
        except asyncio.CancelledError:
            t = asyncio.current_task()
            if t is not None and t.cancelling():
                t.uncancel()
            outcome, error = self.failed(r, Cancelled())
        except Exception as exc:
            outcome, error = self.failed(r, exc)
        self.finish(r, ok, outcome, error, extra)

    def failed(self, r: InFlight, exc: BaseException) -> tuple[str, dict[str, Any]]:
        """(outcome, error) of a request that ended with ``exc``; a lost sandbox starts its replacement."""
        if isinstance(exc, Cancelled):
            return "cancelled", failure("Cancelled", "the request was cancelled")
        if isinstance(exc, RequestFailed):
            return "error", failure(exc.name, exc.message)
        if isinstance(exc, SandboxError):
            if isinstance(exc, SandboxLost):
                self._sandbox_lost(r.sb or self.sb, str(exc))
                return "lost", failure(exc.name, str(exc))
            return "unavailable", failure(exc.name, str(exc))
        # a server bug must still end the request
        logs.log.error("request %s failed", r.req.type, exc_info=exc)
        self.metrics.error("internal")
        return "internal", failure("InternalError", f"{type(exc).__name__}: {exc}")

    def finish(self, r: InFlight, ok: bool, outcome: str, error: dict | None, extra: dict[str, Any]) -> None:
        """The request's one done: accounted, logged and queued (past the high water mark:
        a done is never held back behind output, and there is one per request in flight)."""
        if not self.requests.finish(r):
            return
        req = r.req
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
            if "kind" not in error:  # a failed request unless the user's code raised it (the agent says so)
                error = {**error, "kind": "request"}
            if outcome in ("lost", "unavailable"):
                self.metrics.error("sandbox_unavailable")
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

    def _audit(self, r: InFlight, outcome: str, seconds: float) -> None:
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

    # ---- sandbox events

    def _make_listener(self, sb: Sandbox) -> EventHandler:
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
                self.procs.pop(proc, None)  # its last frame: the table would grow with every process
            elif what == "lost":
                self._sandbox_lost(sb, ev.get("reason") or "the sandbox died")

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
            await self.error("sandbox_unavailable", f"the sandbox died and could not be replaced: {exc}")
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
        self.egress.bind(new)
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
