"""Handles on what the server is doing for us: a ``Request`` (its frames, its
``done``) and a background ``Process`` (its output, its exit).

Both are fed by the session's reader task and read by the caller's task; the
reader never waits on them, so one slow consumer cannot stall the others.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from .frames import DoneFrame, Frame
from .results import _Fold

if TYPE_CHECKING:
    from .session import Session


class SendState(enum.IntEnum):
    """Where a request stands with the server, for the resume logic."""

    NEW = 0  # not written to any socket yet
    SENT = 1  # written to the current socket; no frame of it seen
    UNCERTAIN = 2  # written to a socket that dropped before any frame of it came back
    SEEN = 3  # the server has it: a frame with its id arrived


class Request:
    """One request in flight: iterate it for its frames, await ``wait()`` for its ``done``.

    Frames are kept until read (the server caps a request's output at
    ``max_output_bytes``); one consumer iterates, any number may ``wait()``.
    Cancelling the task that iterates or waits sends ``cancel`` to the server.
    """

    def __init__(self, session: Session, rid: str, frame: dict[str, Any], *, keep_frames: bool = True):
        self.id = rid
        self.type = str(frame["type"])
        self.frame = frame
        self.state = SendState.NEW
        self.generation = 0
        self.resent = False
        self.abandoned = False  # the caller gave up on it; a cancel was sent
        self.done: DoneFrame | None = None
        self.errors: list[dict[str, Any]] = []  # `error` frames that named this request
        self.fold = _Fold()
        self.tokens: list[str] = []  # assist's model text
        self._session = session
        self._keep = keep_frames
        self._frames: deque[Frame] = deque()
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.done is not None or self._failure is not None

    # ---- fed by the session's reader

    def _push(self, frame: dict[str, Any]) -> None:
        if self.state != SendState.SEEN:
            self.state = SendState.SEEN
        kind = frame.get("type")
        if kind == "done":
            self.done = cast(DoneFrame, frame)
        elif kind == "error":
            if self.resent and frame.get("code") == "bad_request":
                # A resend of a request the server already runs: "duplicate id", and no done
                # (its done belongs to the original). Were it a real refusal, a done follows.
                return
            self.errors.append(frame)
        elif kind == "token":
            self.tokens.append(frame.get("text") or "")
        else:
            self.fold.add(frame)
        if self._keep:
            self._frames.append(cast(Frame, frame))
        self._wake.set()

    def _fail(self, exc: BaseException) -> None:
        if not self.finished:
            self._failure = exc
            self._wake.set()

    # ---- read by the caller

    def __aiter__(self) -> Request:
        return self

    async def __anext__(self) -> Frame:
        while True:
            if self._frames:
                return self._frames.popleft()
            if self.done is not None:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            await self._sleep()

    async def wait(self) -> DoneFrame:
        """The request's ``done`` frame (``ok`` may be false); raises ``SessionClosed`` or ``GapError``."""
        while self.done is None:
            if self._failure is not None:
                raise self._failure
            await self._sleep()
        return self.done

    async def cancel(self) -> bool:
        """Ask the server to cancel this request; ``True`` if it was still running there."""
        if self.finished:
            return False
        return await self._session.cancel(self.id)

    async def _sleep(self) -> None:
        self._wake.clear()
        try:
            await self._wake.wait()
        except asyncio.CancelledError:
            # The caller gave up on the request: the server should stop it too.
            self._session._abandon(self)
            raise

    def __repr__(self) -> str:
        return f"<Request {self.type} {self.id} {'done' if self.done else self.state.name}>"


class Process:
    """A background process started with ``Session.start_process``.

    Iterate it for its ``stdout``/``stderr`` frames (and a ``gap`` frame if a
    resume lost some); iteration ends at its ``exit``. Unread output is kept up
    to ``buffer_frames`` frames; past that the oldest frames are dropped and
    counted in ``dropped`` (a long-lived chatty process cannot fill memory).
    """

    def __init__(self, session: Session, process_id: str, command: str, buffer_frames: int):
        self.process_id = process_id
        self.command = command
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.exited = False
        self.lost = False  # the sandbox was replaced: the process is gone
        self.dropped = 0
        self._session = session
        self._frames: deque[Frame] = deque()
        self._max = buffer_frames
        self._wake = asyncio.Event()

    def _push(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "exit":
            code = frame.get("exit_code")
            self.exit_code = code if isinstance(code, int) else None
            self.exited = True
        else:
            if len(self._frames) >= self._max:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(cast(Frame, frame))
        self._wake.set()

    def _end(self, *, lost: bool) -> None:
        self.lost = lost
        self.exited = True
        self._wake.set()

    def read(self) -> list[Frame]:
        """The output frames received and not read yet, without waiting."""
        out = list(self._frames)
        self._frames.clear()
        return out

    def __aiter__(self) -> Process:
        return self

    async def __anext__(self) -> Frame:
        while True:
            if self._frames:
                return self._frames.popleft()
            if self.exited:
                raise StopAsyncIteration
            await self._sleep()

    async def wait(self) -> int | None:
        """Wait for the process to exit; its exit code (``None`` if killed by a signal or lost)."""
        while not self.exited:
            await self._sleep()
        return self.exit_code

    async def kill(self, signal: str | int | None = None) -> None:
        await self._session.kill_process(self.process_id, signal=signal)

    async def _sleep(self) -> None:
        if self._session.closed is not None and not self.exited:
            raise self._session.closed
        self._wake.clear()
        await self._wake.wait()

    def __repr__(self) -> str:
        state = "lost" if self.lost else f"exited {self.exit_code}" if self.exited else "running"
        return f"<Process {self.process_id} pid={self.pid} {state}>"


__all__ = ["Process", "Request", "SendState"]
