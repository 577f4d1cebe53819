"""One WebSocket connection: authentication, then a reader loop and one writer task.

Order of events on ``/v1/ws``:

1. Before the upgrade: Origin and token are checked (``Authenticator``); a
   refusal is an HTTP 401/403 denial response (close 4401/4403 where the server
   cannot send one). Nothing about any session is revealed.
2. Accept (with subprotocol ``groundloop.v1`` when offered), then attach to a
   new session, or resume one (``?session=&last_seq=``). An unknown session id
   and another user's id both get ``error`` ``not_found`` and close 4404.
3. The reader hands every frame to the session; the writer sends the session's
   outbox from its cursor on. A send that does not complete within
   ``send_timeout_s`` closes the socket (4408) and leaves the session resumable.
4. On disconnect the session is detached, not closed: it waits
   ``resume_grace_s`` for a resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from groundloop.sandbox.base import SandboxError
from groundloop.sandbox.workspaces import WorkspaceError
from groundloop.sessions import logs
from groundloop.sessions.egress import parse_param as parse_egress
from groundloop.sessions.errors import (
    CLOSE_BAD_REQUEST,
    CLOSE_DRAINING,
    CLOSE_FORBIDDEN,
    CLOSE_INTERNAL,
    CLOSE_NOT_FOUND,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TAKEN_OVER,
    CLOSE_TOO_MANY_SESSIONS,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
    AuthError,
    LimitError,
)
from groundloop.sessions.outbox import ResumeError
from groundloop.sessions.protocol import encode, error_frame, shown, with_seq
from groundloop.sessions.session import Session, SessionClosed
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from . import uvicorn_adapter
from .uvicorn_adapter import RAW_SEND, BatchWriter

if TYPE_CHECKING:
    from .app import AppState

CLOSE_WAIT_S = 2.0
WRITE_BATCH_FRAMES = 256


async def websocket_endpoint(ws: WebSocket) -> None:
    gl = ws.scope["app"].state.groundloop
    try:
        user, subprotocol = gl.auth.websocket(ws.headers, list(ws.scope.get("subprotocols") or []), ws.url.scheme)
    except AuthError as exc:
        gl.metrics.error(exc.code)
        logs.event("refused", logging.WARNING, code=exc.code, client=_client(ws), origin=ws.headers.get("origin"))
        await _deny(ws, exc.status, exc.message)
        return
    if gl.manager is None or gl.manager.closing:
        await _deny(ws, 503, "the server is shutting down")
        return
    uvicorn_adapter.set_nodelay(ws.scope)
    await ws.accept(subprotocol=subprotocol)
    gl.metrics.connections.inc()
    conn = Connection(ws, gl, user)
    try:
        await conn.run()
    finally:
        gl.metrics.connections.dec()


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(PlainTextResponse(message, status_code=status))
    else:
        await ws.close(CLOSE_FORBIDDEN if status == 403 else CLOSE_UNAUTHORIZED)


def _client(ws: WebSocket) -> str | None:
    c = ws.client
    return f"{c.host}:{c.port}" if c else None


class Connection:
    def __init__(self, ws: WebSocket, gl: AppState, user: str):
        self.ws = ws
        self.gl = gl
        self.user = user
        self.session: Session | None = None
        self.writer: asyncio.Task[None] | None = None
        self.batch: BatchWriter | None = None  # the fast path of the writer, see _write_loop
        self.closed = False
        self.close_code: int | None = None
        self._sending_since: float | None = None
        self.t0 = time.monotonic()

    # ---- life cycle

    async def run(self) -> None:
        q = self.ws.query_params
        resume = q.get("session")
        logs.event("connect", user=self.user, client=_client(self.ws), resume=resume)
        if resume is not None:
            ok = await self._resume(resume, q.get("last_seq", "0"))
        else:
            ok = await self._new(q.get("workspace"))
        if not ok:
            return
        session = self.session
        assert session is not None
        self.writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{session.id[:8]}")
        watchdog = asyncio.create_task(self._watchdog(session), name=f"ws-watchdog-{session.id[:8]}")
        try:
            await self._read_loop(session)
        finally:
            await self._stop_writer()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            session.detach(self)
            logs.event(
                "disconnect",
                user=self.user,
                session=session.id,
                code=self.close_code,
                seconds=round(time.monotonic() - self.t0, 3),
            )

    async def _new(self, workspace: str | None = None) -> bool:
        try:
            egress = parse_egress(self.ws.query_params.get("egress"))
        except ValueError as exc:
            await self._fail("bad_request", str(exc), CLOSE_BAD_REQUEST)
            return False
        try:
            assert self.gl.manager is not None  # set before the first connection is accepted
            session = await self.gl.manager.create(self.user, workspace, egress=egress)
        except LimitError as exc:
            # A draining server tells the client to connect again at once: the proxy has taken it
            # out of rotation, so the next connection reaches another server (server/drain.py).
            await self._fail(
                exc.code, exc.message, CLOSE_DRAINING if exc.code == "draining" else CLOSE_TOO_MANY_SESSIONS
            )
            return False
        except SandboxError as exc:
            await self._fail("sandbox_unavailable", f"no sandbox could be started: {exc}", CLOSE_TRY_LATER)
            return False
        except WorkspaceError as exc:  # a bad name, no workspaces here, the quota (sessions/workspaces.py)
            close = CLOSE_INTERNAL if exc.code == "internal" else CLOSE_BAD_REQUEST
            await self._fail(exc.code, f"workspace {shown(workspace)}: {exc.message}", close)
            return False
        self.session = session
        await session.attach(self)
        return True

    async def _resume(self, session_id: str, raw_last: str) -> bool:
        try:
            last_seq = int(raw_last)
        except ValueError:
            await self._fail("bad_request", "last_seq must be an integer", CLOSE_BAD_REQUEST)
            return False
        assert self.gl.manager is not None
        session = self.gl.manager.find(self.user, session_id)
        if session is None:
            await self._fail("not_found", "no such session (it may have expired)", CLOSE_NOT_FOUND)
            return False
        try:
            await session.attach(self, last_seq)
        except ResumeError as exc:
            await self._fail("bad_request", str(exc), CLOSE_BAD_REQUEST)
            return False
        except SessionClosed:
            await self._fail("not_found", "no such session (it may have expired)", CLOSE_NOT_FOUND)
            return False
        self.session = session
        return True

    async def _fail(self, code: str, message: str, close_code: int) -> None:
        """Refuse after the upgrade: one error frame with seq 0 (no session), then close."""
        self.gl.metrics.error(code)
        logs.event("error", logging.WARNING, user=self.user, code=code, message=message)
        try:
            await self.ws.send_text(with_seq(0, encode(error_frame(code, message))).decode())
        except Exception:
            pass
        await self.close(close_code, code)

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket with ``code``; a peer that reads nothing gets its transport aborted."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        if self.session is not None:
            # Detach now: the reader may be parked in a full outbox and see the disconnect late.
            self.session.detach(self)
        await self._stop_writer()
        try:
            await asyncio.wait_for(self.ws.close(code, reason[:120]), CLOSE_WAIT_S)
        except (TimeoutError, Exception):
            self.abort()

    async def kick_for_takeover(self) -> None:
        await self.close(CLOSE_TAKEN_OVER, "taken over by another connection")

    def abort(self) -> None:
        uvicorn_adapter.abort(self.ws.scope)

    async def _stop_writer(self) -> None:
        w, self.writer = self.writer, None
        if w is not None and w is not asyncio.current_task():
            w.cancel()
            await asyncio.gather(w, return_exceptions=True)

    # ---- reading and writing

    async def _read_loop(self, session: Session) -> None:
        receive = self.ws.receive
        while not self.closed:
            msg = await receive()
            kind = msg["type"]
            if kind == "websocket.disconnect":
                self.close_code = self.close_code or msg.get("code")
                self.closed = True
                return
            data = msg.get("text")
            if data is None:
                data = msg.get("bytes")
            if data is None or session.conn is not self:
                continue
            try:
                await session.handle_frame(data, self)
            except ConnectionError:
                return  # the session closed

    async def _write_loop(self) -> None:
        """Send the outbox from its cursor on. A watchdog cuts a send stuck past send_timeout_s.

        Frames go straight to the server's ASGI send (the socket's only writer is
        this task, so Starlette's per-call state checks add nothing but time).
        """
        session = self.session
        assert session is not None
        outbox = session.outbox
        send = self.ws.scope.get(RAW_SEND) or self.ws.send
        m = self.gl.metrics
        observe, frames_inc, bytes_inc = m.send_wait.observe, m.frames_out.inc, m.bytes_out.inc
        clock = time.perf_counter
        batch = self.batch = uvicorn_adapter.batch_writer(send)
        while True:
            try:
                # Everything queued goes in one write (up to a bound), or one by one without a batcher.
                await outbox.wait_unsent()
                frames = outbox.peek_frames(WRITE_BATCH_FRAMES if batch is not None else 1)
            except ConnectionError:
                return
            first, last = frames[0].seq, frames[-1].seq
            now = clock()
            observe(now - frames[0].t)  # the oldest frame of the write
            self._sending_since = now
            try:
                if batch is not None:
                    size, rests = await batch(frames)
                else:
                    wire = frames[0].wire()
                    await send({"type": "websocket.send", "text": wire.decode()})
                    size, rests = len(wire), len(frames[0].rest)
            except asyncio.CancelledError:
                raise
            except Exception:
                return  # the peer is gone; the reader sees the disconnect
            finally:
                self._sending_since = None
            outbox.mark_sent_many(first, last, rests)
            frames_inc(len(frames))
            bytes_inc(size)

    async def _watchdog(self, session: Session) -> None:
        """Close the socket of a client that accepts nothing for send_timeout_s (4408)."""
        timeout = self.gl.settings.send_timeout_s
        period = max(0.01, timeout / 4)
        while True:
            await asyncio.sleep(period)
            since = self._sending_since
            if since is not None and time.perf_counter() - since > timeout:
                break
        logs.event(
            "slow_consumer",
            logging.WARNING,
            user=self.user,
            session=session.id,
            unsent=session.outbox.unsent,
            send_timeout_s=timeout,
        )
        await self.close(CLOSE_SLOW_CONSUMER, "the client did not read; resume to go on")
