"""Every live session of a server: creation, lookup for resume, limits, reaping.

- ``create(user)`` acquires a sandbox from the engine; a user over
  ``max_sessions_per_user`` gets ``LimitError(busy)``.
- ``find(user, session_id)`` returns None for an unknown id and for another
  user's id alike.
- ``check_limits`` applies the per-session in-flight cap and the per-user
  token bucket to a new request.
- One owned reaper task closes sessions detached longer than
  ``resume_grace_s`` or idle (no request) longer than ``idle_timeout_s``.
- ``close()`` (shutdown) closes every session: requests cancelled, sockets
  closed with 1012, sandboxes released.
- While ``draining`` (set by server/drain.py on SIGTERM), new sessions, new
  validations and new requests (but ``ping`` and ``cancel``) are refused with
  ``LimitError(draining)``; running requests go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from groundloop.sandbox.engine import Engine

from . import logs
from .errors import CLOSE_RESTART, CLOSE_SESSION_CLOSED, LimitError
from .protocol import Request
from .seams import Assistant, SessionMetrics, SessionSettings
from .session import Session
from .workspaces import Workspaces


class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; ``take()`` is False when empty."""

    __slots__ = ("rate", "burst", "tokens", "t")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.t = clock()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SessionManager:
    def __init__(
        self, settings: SessionSettings, engine: Engine, metrics: SessionMetrics, assist: Assistant | None = None
    ):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.assist = assist
        self.sessions: dict[str, Session] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: dict[str, int] = {}  # sessions being created, and validations running, per user
        self._validating = 0  # validate-code runs in progress, server-wide
        self._validating_by: dict[str, int] = {}  # and per user
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.closing = False
        self.draining = False
        self.workspaces = Workspaces(settings.sandbox, engine.backend)

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop(), name="session-reaper")

    def own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- sessions

    @property
    def pending(self) -> int:
        """Sessions being created and validations running (they hold or await a sandbox)."""
        return sum(self._pending.values())

    def user_sessions(self, user: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.user == user and s.live]

    async def create(self, user: str, workspace: str | None = None, egress: list[str] | None = None) -> Session:
        """A new session holding a fresh sandbox; with ``workspace``, that named workspace of the user's
        at /workspace (sessions/workspaces.py). ``egress`` narrows the server's egress allow-list for this
        session (sessions/egress.py). Raises LimitError, SandboxError or WorkspaceError."""
        if self.draining:
            raise LimitError("this server is draining: connect again to reach another", code="draining")
        if self.closing:
            raise LimitError("the server is shutting down", code="busy")
        n = len(self.user_sessions(user)) + self._pending.get(user, 0)
        if n >= self.settings.max_sessions_per_user:
            raise LimitError(f"user has {n} sessions, the limit is {self.settings.max_sessions_per_user}", code="busy")
        with self._holding(user):
            if workspace is None:
                sb = await self.engine.acquire()
            else:
                sb = await self._acquire_with_workspace(user, workspace)
        if self.closing:
            await self.engine.release(sb)
            if workspace is not None:
                self.workspaces.release(user, workspace)
            raise LimitError("the server is shutting down", code="busy")
        session = Session(user=user, sandbox=sb, manager=self, egress=egress)
        session.workspace = workspace
        self.sessions[session.id] = session
        self.metrics.sessions.set(len(self.sessions))
        logs.event("session_created", user=user, session=session.id, warm=sb.warm)
        return session

    async def _acquire_with_workspace(self, user: str, workspace: str):
        path = await self.workspaces.open(user, workspace)
        try:
            return await self.engine.acquire(path)
        except BaseException:
            self.workspaces.release(user, workspace)
            raise

    def find(self, user: str, session_id: str) -> Session | None:
        s = self.sessions.get(session_id)
        if s is None or s.user != user or not s.live:
            return None
        return s

    @contextmanager
    def _holding(self, user: str) -> Iterator[None]:
        """Count a sandbox being acquired or used outside a session against ``user``'s session cap."""
        self._pending[user] = self._pending.get(user, 0) + 1
        try:
            yield
        finally:
            self._pending[user] -= 1
            if not self._pending[user]:
                del self._pending[user]

    @asynccontextmanager
    async def validation(self, user: str) -> AsyncIterator[None]:
        """The limits of one ``validate-code`` run, held while it runs.

        It takes a token from the user's bucket, counts as one of the user's
        sessions (it holds a sandbox), and is one of at most
        ``validate_concurrency`` runs server-wide, of which one user may hold
        half (at least one), so that no user can keep every other out.
        Raises LimitError.
        """
        s = self.settings
        if self.draining:
            raise LimitError("this server is draining: send it to another", code="draining")
        if self.closing:
            raise LimitError("the server is shutting down", code="busy")
        if not self._bucket(user).take(time.monotonic()):
            raise LimitError(f"over {s.rate_per_s:g} requests/s (burst {s.rate_burst})", code="rate_limited")
        n = len(self.user_sessions(user)) + self._pending.get(user, 0)
        if n >= s.max_sessions_per_user:
            raise LimitError(
                f"user has {n} sessions and validations running, the limit is {s.max_sessions_per_user}", code="busy"
            )
        if self._validating >= s.validate_concurrency:
            raise LimitError(
                f"{self._validating} validations are running, the server's limit is "
                f"{s.validate_concurrency}; try again",
                code="busy",
            )
        mine = self._validating_by.get(user, 0)
        per_user = max(1, s.validate_concurrency // 2)
        if mine >= per_user:
            raise LimitError(
                f"{mine} of this user's validations are running, the limit per user is {per_user}", code="busy"
            )
        self._validating += 1
        self._validating_by[user] = mine + 1
        try:
            with self._holding(user):
                yield
        finally:
            self._validating -= 1
            self._validating_by[user] -= 1
            if not self._validating_by[user]:
                del self._validating_by[user]

    async def close_session(self, session: Session, reason: str, code: int = CLOSE_SESSION_CLOSED) -> None:
        try:
            await session.close(reason, code)
        finally:
            if self.sessions.pop(session.id, None) is not None and session.workspace is not None:
                self.workspaces.release(session.user, session.workspace)
            self.metrics.sessions.set(len(self.sessions))

    # ---- limits

    def check_limits(self, session: Session, req: Request) -> LimitError | None:
        if self.draining and req.type not in ("ping", "close_session"):
            return LimitError(
                "this server is draining: no new requests; running ones finish, then the session closes "
                "(connect again for a new session on another server)",
                code="draining",
                id=req.id,
            )
        # close_session ends everything in flight: a full session must still be able to end.
        if len(session.requests) >= self.settings.max_inflight and req.type != "close_session":
            return LimitError(
                f"{len(session.requests)} requests in flight, the limit is {self.settings.max_inflight}",
                code="busy",
                id=req.id,
            )
        if not self._bucket(session.user).take(time.monotonic()):
            return LimitError(
                f"over {self.settings.rate_per_s:g} requests/s (burst {self.settings.rate_burst})",
                code="rate_limited",
                id=req.id,
            )
        return None

    def take_token(self, user: str) -> bool:
        """One request of ``user`` outside a session (an HTTP route): False when over the token bucket."""
        return self._bucket(user).take(time.monotonic())

    def _bucket(self, user: str) -> TokenBucket:
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.settings.rate_per_s, self.settings.rate_burst)
        return bucket

    # ---- reaping

    def _reap_period(self) -> float:
        s = self.settings
        return max(0.05, min(5.0, s.resume_grace_s / 4, s.idle_timeout_s / 4))

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_period())
            await self.reap(time.monotonic())

    async def reap(self, now: float) -> int:
        """Close the sessions past their grace or idle time; returns how many."""
        s = self.settings
        doomed = []
        for session in list(self.sessions.values()):
            if session.detached_at is not None and now - session.detached_at > s.resume_grace_s:
                doomed.append((session, "resume_grace"))
            elif session.idle_for(now) > s.idle_timeout_s:
                doomed.append((session, "idle"))
        for session, why in doomed:
            logs.event("session_reaped", user=session.user, session=session.id, reason=why)
            await self.close_session(session, why)
        # Forget idle buckets so a token-bucket map does not grow with users.
        for user in [u for u, b in self._buckets.items() if now - b.t > 600 and not self.user_sessions(u)]:
            del self._buckets[user]
        return len(doomed)

    async def close(self) -> None:
        """Shutdown: close every session (sockets 1012), release every sandbox."""
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        sessions = list(self.sessions.values())
        await asyncio.gather(
            *(self.close_session(s, "shutdown", CLOSE_RESTART) for s in sessions), return_exceptions=True
        )
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.workspaces.close()
        logs.event("sessions_closed", logging.INFO, count=len(sessions))
