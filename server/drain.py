"""Graceful drain: what a server does between SIGTERM and its exit, so a fleet loses no request.

uvicorn alone, on SIGTERM, closes every WebSocket with 1012 at once and
cancels what runs. A server of a fleet does this instead (``DrainingServer``
catches the first SIGTERM; a second one, or SIGINT, is the plain shutdown):

1. At once, ``SessionManager.draining``: ``/readyz`` answers 404
   ``{"ready": false, "draining": true}`` (HAProxy's ``disable-on-404`` stops
   sending it new sessions but still routes resumes to it; Kubernetes takes
   the pod out of its endpoints); a new session gets ``error`` ``draining``
   and close 4503 (connect again: the proxy picks another server); a new
   request gets ``error`` ``draining`` and its ``done``; ``ping`` and
   ``cancel`` still work.
2. Every session is sent one ``draining`` frame with the time left
   (``deadline_s``); a detached session gets it when its client resumes
   (resumes still reach a draining server).
3. A session closes (1012) as soon as it has no request in flight and every
   frame was written to its client, so a client waits no longer than its own
   running requests. A detached session's unsent frames wait for its client's
   resume until the deadline or the end of its resume grace, whichever first. At
   ``GROUNDLOOP_DRAIN_S`` the requests still running are cancelled (each
   still ends with its ``done``, ``Cancelled``), and ``CANCEL_GRACE_S`` later
   whatever is left is closed.
4. Then the ordinary shutdown: uvicorn stops listening, the lifespan closes
   the engine, which removes the warm pool's containers.

The drain loop polls (every ``POLL_S``) instead of waiting on per-session
events: it runs once in a server's life, and polling keeps it out of the
session's hot path (no hook in ``Session`` for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import uvicorn
from groundloop.sessions import logs
from groundloop.sessions.errors import CLOSE_RESTART

POLL_S = 0.05
CANCEL_GRACE_S = 2.0  # for cancelled requests' done frames to reach their clients


def draining_frame(deadline_s: float) -> dict[str, Any]:
    return {
        "type": "draining",
        "deadline_s": round(max(0.0, deadline_s), 3),
        "message": (
            "this server is shutting down: running requests finish (at most deadline_s), then the session "
            "closes with 1012; new requests are refused. Connect again without `session` for a new session "
            "on another server"
        ),
    }


async def drain(state: Any, drain_s: float) -> int:
    """Drain the server of ``state`` (its ``AppState``); returns how many sessions it closed."""
    manager = state.manager
    if manager is None:
        return 0
    manager.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_s
    t0 = time.monotonic()
    logs.event("draining", logging.WARNING, sessions=len(manager.sessions), drain_s=drain_s)
    grace_s = manager.settings.resume_grace_s
    told: dict[str, int] = {}  # session id -> the seq of its draining frame
    cancelled: set[str] = set()
    closed = 0
    while True:
        now = loop.time()
        done = []
        for session in list(manager.sessions.values()):
            if not session.live:
                continue
            if session.id not in told:
                told[session.id] = 0
                with contextlib.suppress(ConnectionError):
                    told[session.id] = session.outbox.put_nowait(draining_frame(deadline - now))
                continue  # let the writer send it before anything closes
            if now >= deadline and session.inflight and session.id not in cancelled:
                cancelled.add(session.id)
                for rid in list(session.inflight):
                    session.cancel(rid)
            if _finished(session, told[session.id], now >= deadline, grace_s) or now >= deadline + CANCEL_GRACE_S:
                done.append(session)
        if done:
            closed += len(done)
            await asyncio.gather(
                *(manager.close_session(s, "drained", CLOSE_RESTART) for s in done), return_exceptions=True
            )
        if (not manager.sessions and not manager.pending) or loop.time() >= deadline + CANCEL_GRACE_S + 1.0:
            break
        await asyncio.sleep(POLL_S)
    logs.event("drained", logging.WARNING, closed=closed, seconds=round(time.monotonic() - t0, 3))
    return closed


def _finished(session: Any, draining_seq: int, past_deadline: bool, grace_s: float) -> bool:
    """Nothing in flight and every frame written to the client, so closing loses nothing.

    A detached session's unsent frames (its last output, its ``done``) wait for the client that is
    reconnecting, until the drain deadline or its resume grace, whichever comes first. Its draining
    frame alone does not keep it: a client gone for good would hold the drain to its deadline.
    """
    if session.inflight:
        return False
    outbox = session.outbox
    if not outbox.unsent:
        return True
    if session.conn is not None:
        return False  # the writer is sending them
    if outbox.unsent == 1 and draining_seq > outbox.sent_seq:
        return True
    detached_at = session.detached_at  # None: a resume is taking over, its writer will send them
    return past_deadline or (detached_at is not None and time.monotonic() - detached_at >= grace_s)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before the shutdown on the first SIGTERM."""

    def __init__(self, config: Any, state: Any, drain_s: float):
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None
        self._drain_asked = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            if self._drain is not None and not self._drain.done():
                self._drain.cancel()
                await asyncio.gather(self._drain, return_exceptions=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not self._drain_asked and not self.should_exit and self._loop is not None:
            # A signal handler runs between two bytecodes of the loop's own thread: hand over.
            self._drain_asked = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None and not self.should_exit:
            self._drain = asyncio.create_task(self._drain_then_exit(), name="drain")

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self.drain_s)
        finally:
            self.should_exit = True
