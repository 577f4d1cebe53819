"""The request table: a session's requests in flight, each with an explicit state.

States (``ReqState``, changed only by ``InFlight.transition``)::

    NEW --start--> RUNNING ----finish----> DONE
     |  \\            |                      ^  ^
     |   `---------- | ------finish---------'  |
     `--cancel--> CANCELLING <--cancel--'      |
                     `---------finish----------'

- NEW: accepted and in the table; nothing of it has run. A cancel only marks
  it CANCELLING: its task sees that first thing and ends it, sandbox untouched.
  A request answered in place (``ping``) goes from NEW to DONE.
- RUNNING: its handler runs, or its op is with the agent (``agent_rid`` set).
  A cancel marks it CANCELLING and interrupts it (the agent's cancel, or the
  task's).
- CANCELLING: a cancel was asked. The request still ends with exactly one
  ``done`` (``Cancelled``, or the agent's own answer when it came first).
- DONE: its ``done`` frame is queued and it has left the table. A second
  finish is ignored (the agent's done and a cancel can race).

The table also keeps the agent ops that wait for a sandbox (``queued``): while
any does, later agent ops queue behind it, so requests reach the sandbox in
the order they arrived.

``outcome_of`` is the one mapping from an agent ``done`` (or a request's
result) to the ``outcome`` label of the metrics and logs.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator, Mapping
from typing import Any

from groundloop.sandbox.base import Sandbox

from .protocol import Request


class ReqState(enum.IntEnum):
    NEW = 0
    RUNNING = 1
    CANCELLING = 2
    DONE = 3


_ALLOWED: dict[ReqState, frozenset[ReqState]] = {
    ReqState.NEW: frozenset({ReqState.RUNNING, ReqState.CANCELLING, ReqState.DONE}),
    ReqState.RUNNING: frozenset({ReqState.CANCELLING, ReqState.DONE}),
    ReqState.CANCELLING: frozenset({ReqState.DONE}),
    ReqState.DONE: frozenset(),
}


class Cancelled(Exception):
    """A request was cancelled before it reached the sandbox."""


class InFlight:
    """One accepted request: its state, its task (if any), its agent op (if any)."""

    __slots__ = ("req", "state", "task", "t0", "t_sent", "agent_rid", "sb", "first_output")

    def __init__(self, req: Request):
        self.req = req
        self.state = ReqState.NEW
        self.task: asyncio.Task[None] | None = None
        self.t0 = self.t_sent = time.perf_counter()
        self.agent_rid: str | None = None  # the agent's rid of the op it runs now
        self.sb: Sandbox | None = None  # the sandbox that op went to
        self.first_output = False  # the first-output metric was observed

    def transition(self, new: ReqState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(
                f"request {self.req.id!r} ({self.req.type}): expected a state in "
                f"{sorted(s.name for s in _ALLOWED[self.state])}, got {new.name}"
            )
        self.state = new

    @property
    def cancelling(self) -> bool:
        return self.state is ReqState.CANCELLING

    @property
    def done(self) -> bool:
        return self.state is ReqState.DONE


class RequestTable:
    """The requests in flight of one session, by client id."""

    def __init__(self) -> None:
        self._reqs: dict[Any, InFlight] = {}
        self.queued: set[InFlight] = set()  # agent ops whose task waits for a sandbox

    def __contains__(self, id: object) -> bool:
        return id in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._reqs)

    def get(self, id: Any) -> InFlight | None:
        return self._reqs.get(id)

    def values(self) -> list[InFlight]:
        return list(self._reqs.values())

    def add(self, req: Request) -> InFlight:
        """Enter ``req``; a second request with an id in flight is a server bug (it would orphan the first)."""
        if req.id in self._reqs:
            raise ValueError(f"a request with id {req.id!r} is already in flight")
        r = self._reqs[req.id] = InFlight(req)
        return r

    def queue(self, r: InFlight) -> None:
        """``r`` waits for a sandbox: later agent ops must queue behind it."""
        self.queued.add(r)

    def unqueue(self, r: InFlight) -> None:
        """``r`` reached the sandbox, or ended without."""
        self.queued.discard(r)

    def finish(self, r: InFlight) -> bool:
        """Move ``r`` to DONE and out of the table; False when it already was."""
        if r.state is ReqState.DONE:
            return False
        r.transition(ReqState.DONE)
        self.queued.discard(r)
        if self._reqs.get(r.req.id) is r:
            del self._reqs[r.req.id]
        return True


# Agent error names that are not a plain failure of the user's code. WorkerDied (the
# user's code took its worker down: the OOM killer, os._exit) is "error": the sandbox
# lives on, and "lost" means the sandbox went (it is replaced, and counted as
# sandbox_unavailable).
_OUTCOME_BY_ERROR = {"Timeout": "timeout", "Cancelled": "cancelled", "SandboxLost": "lost"}


def outcome_of(done: Mapping[str, Any] | None) -> str:
    """The outcome label of a request from its agent ``done`` dict (or its result, or the wire ``done``).

    ``ok``; ``timeout``, ``cancelled`` or ``lost`` by error name; otherwise
    ``error`` (an exception in the user's code, a non-zero exit code, a bad
    argument). ``None`` (no done at all: the sandbox vanished) is ``lost``.
    """
    if done is None:
        return "lost"
    error = done.get("error") or {}
    name = error.get("name") if isinstance(error, Mapping) else None
    if name in _OUTCOME_BY_ERROR:
        return _OUTCOME_BY_ERROR[name]
    if not done.get("ok"):
        return "error"
    if done.get("exit_code") not in (None, 0):
        return "error"
    return "ok"


_STRIP = frozenset({"ev", "rid", "ok", "error", "agent_ms"})


def done_fields(done: Mapping[str, Any]) -> dict[str, Any]:
    """The client's ``done`` fields of an agent done: ``ok``, ``error`` and the op's own results."""
    out = {k: v for k, v in done.items() if k not in _STRIP}
    out["ok"] = bool(done.get("ok"))
    if done.get("error"):
        out["error"] = done["error"]
    return out
