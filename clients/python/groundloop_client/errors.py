"""The client's exceptions, one tree::

    GroundloopError
    ├── ConnectError        the session could not be opened (refused, unreachable, no sandbox)
    │   └── AuthError       HTTP 401 / 403: the token or the Origin was refused
    ├── SessionClosed       the session ended: closed by the server, taken over, not resumable
    ├── GapError            frames of this request were evicted before a resume could fetch them
    ├── RequestError        a request ended ``ok: false`` (``name`` is the protocol's error name)
    └── ProtocolError       the server sent something the contract does not allow

Requests that run user code (``run_code``, ``exec``, ``assist``) do not raise
``RequestError`` for the code's own failure: their result carries ``error``
(see ``Execution.raise_for_error``).
"""

from __future__ import annotations

from typing import Any


class GroundloopError(Exception):
    """Base of every exception this package raises."""


class ConnectError(GroundloopError):
    """Opening (or resuming) the session failed.

    ``status`` is the HTTP status of a refused upgrade, ``code`` the protocol
    error code of an ``error`` frame sent before the session existed (``busy``,
    ``sandbox_unavailable``), ``close_code`` the WebSocket close code.
    """

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, close_code: int | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.close_code = close_code


class AuthError(ConnectError):
    """The server refused the token (401) or the Origin (403)."""


class SessionClosed(GroundloopError):
    """The session is over: requests still pending fail with this.

    ``close_code`` is the WebSocket close code that ended it (4404 session
    expired, 4409 another connection resumed it, 4410 closed by the server...),
    or ``None`` when the client closed it.
    """

    def __init__(self, message: str, *, close_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.close_code = close_code
        self.code = code


class GapError(GroundloopError):
    """A resume found frames already evicted from the server's replay buffer.

    Every request still pending at that moment fails with this (its output or
    its ``done`` may be among the lost frames), and the client asks the server
    to cancel it. ``missed`` frames, ``first_missed_seq`` to ``last_missed_seq``.
    """

    def __init__(self, frame: dict[str, Any]):
        self.missed = int(frame.get("missed") or 0)
        self.first_missed_seq = frame.get("first_missed_seq")
        self.last_missed_seq = frame.get("last_missed_seq")
        super().__init__(frame.get("message") or f"{self.missed} frames were lost before the session was resumed")


class RequestError(GroundloopError):
    """A request ended with ``ok: false``.

    ``name`` is the protocol's error name (``BadRequest``, ``Busy``,
    ``RateLimited``, ``Cancelled``, ``Timeout``, ``SandboxLost``,
    ``FileNotFound``...), ``done`` the whole ``done`` frame.
    """

    def __init__(self, name: str, message: str, *, traceback: str | None = None, done: dict[str, Any] | None = None):
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.message = message
        self.traceback = traceback
        self.done = done or {}

    @classmethod
    def from_done(cls, done: dict[str, Any]) -> RequestError:
        err = done.get("error") or {}
        return cls(
            str(err.get("name") or "Error"),
            str(err.get("message") or ""),
            traceback=err.get("traceback"),
            done=done,
        )


class ProtocolError(GroundloopError):
    """The server broke the wire contract (a frame that cannot be read, a seq that jumps)."""


__all__ = [
    "AuthError",
    "ConnectError",
    "GapError",
    "GroundloopError",
    "ProtocolError",
    "RequestError",
    "SessionClosed",
]
