"""Helpers of the unit tier: a session manager over the fake backend, a fake connection, a reader of a
session's outbox (what the connection's writer does), and a real server over the fake backend.

Nothing here needs Docker; the server helper runs a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson
from groundloop.sandbox.engine import Engine
from groundloop.sandbox.settings import SandboxSettings, load
from groundloop.server.metrics import Metrics
from groundloop.server.settings import Settings
from groundloop.sessions.manager import SessionManager
from groundloop.sessions.session import Session

from .fake_sandbox import FakeAgent, FakeBackend

HANG_GUARD_S = 30.0  # not a timed assertion: a bound on a test that would otherwise hang
TOKENS = ["tok1:alice", "tok2:bob"]


def settings(**overrides: Any) -> Settings:
    """Server settings for the unit tier: environment ignored, no warm pool."""
    sandbox = overrides.pop("sandbox", None)
    if sandbox is None:
        sandbox = dataclasses.replace(load(SandboxSettings, {}), pool_size=0)
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "tokens": list(TOKENS), "sandbox": sandbox}
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


class FakeConn:
    """A connection a session can be attached to: it records how it was closed."""

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None
        self.kicked = False

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    async def kick_for_takeover(self) -> None:
        self.kicked = True
        await self.close(4409, "taken over by another connection")


class Harness:
    """A started engine (fake backend, pool 0) and a session manager, with its metrics."""

    def __init__(self, manager: SessionManager, backend: FakeBackend, metrics: Metrics):
        self.manager = manager
        self.backend = backend
        self.metrics = metrics

    async def session(self, user: str = "alice", conn: FakeConn | None = None) -> tuple[Session, Reader]:
        """A new session, attached to ``conn`` (a new FakeConn by default), and a reader of it."""
        s = await self.manager.create(user)
        await s.attach(conn or FakeConn())
        return s, Reader(s)

    def agent(self, session: Session) -> FakeAgent:
        return self.backend.agent_of(session.sb)


@contextlib.asynccontextmanager
async def harness(assist: Any = None, **overrides: Any) -> AsyncIterator[Harness]:
    s = settings(**overrides)
    backend = FakeBackend()
    metrics = Metrics()
    engine = Engine(backend, s.sandbox, hooks=metrics)
    await engine.start()
    manager = SessionManager(s, engine, metrics, assist)
    try:
        yield Harness(manager, backend, metrics)
    finally:
        await manager.close()
        await engine.close()


class Reader:
    """Reads a session's outbox as the connection's writer does: each frame sent, in seq order."""

    def __init__(self, session: Session):
        self.session = session
        self.frames: list[dict[str, Any]] = []

    async def _next(self) -> dict[str, Any]:
        ob = self.session.outbox
        await ob.wait_unsent()
        f = ob.peek_frames(1)[0]
        ob.mark_sent(f.seq)
        frame = orjson.loads(f.wire())
        self.frames.append(frame)
        return frame

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self._next(), HANG_GUARD_S)

    async def until(self, pred: Any) -> dict[str, Any]:
        """Read until a frame matches ``pred``; that frame."""
        while True:
            frame = await self.next()
            if pred(frame):
                return frame

    async def done(self, id: Any) -> dict[str, Any]:
        """The done of request ``id`` (read already, or read until it comes)."""
        for f in self.frames:
            if f["type"] == "done" and f.get("id") == id:
                return f
        return await self.until(lambda f: f["type"] == "done" and f.get("id") == id)

    async def request(self, type_: str, id: Any, **fields: Any) -> list[dict[str, Any]]:
        """Send one request; every frame of it up to its done."""
        start = len(self.frames)
        await self.session.handle_frame(orjson.dumps({"type": type_, "id": id, **fields}))
        await self.done(id)
        return [f for f in self.frames[start:] if f.get("id") == id]

    def pending(self) -> list[dict[str, Any]]:
        """The frames queued and not yet read, without reading them."""
        ob = self.session.outbox
        return [orjson.loads(f.wire()) for f in ob.peek_frames(ob.unsent)] if ob.unsent else []


def done_count(frames: list[dict[str, Any]], id: Any) -> int:
    return sum(1 for f in frames if f["type"] == "done" and f.get("id") == id)


@contextlib.asynccontextmanager
async def fake_server(**overrides: Any) -> AsyncIterator[Any]:
    """A real uvicorn (websockets-sansio) on 127.0.0.1 serving the app over the fake backend.

    Yields uvicorn's server; ``server.groundloop_port`` is the port, ``server.config.app`` the app
    (``.state.groundloop``), ``server.backend`` the FakeBackend.
    """
    from groundloop.server.app import create_app, serve_in_process

    class _Off:
        available = False

    s = settings(**overrides)
    backend = FakeBackend()
    engine = Engine(backend, s.sandbox, hooks=None)
    app = create_app(s, engine=engine, assist=_Off())
    try:
        async with serve_in_process(app, s) as uv:
            uv.backend = backend
            uv.app = app
            yield uv
    finally:
        await engine.close()
