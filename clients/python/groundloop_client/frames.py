"""The server's frames as typed dictionaries (docs/protocol.md, section 3).

A request's frames are yielded as these dicts, unchanged; the ``type`` field
discriminates the union, so a type checker narrows ``frame["type"] ==
"stdout"`` to ``StdoutFrame``. Fields marked ``NotRequired`` may be absent.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class ErrorInfo(TypedDict):
    name: str
    message: str
    traceback: NotRequired[str | None]


class ReadyFrame(TypedDict):
    seq: int
    type: Literal["ready"]
    session_id: str
    resumed: bool
    sandbox: dict[str, Any]
    limits: dict[str, Any]
    protocol: str


class StdoutFrame(TypedDict):
    seq: int
    type: Literal["stdout"]
    id: str
    text: str
    process_id: NotRequired[str]
    iteration: NotRequired[int]


class StderrFrame(TypedDict):
    seq: int
    type: Literal["stderr"]
    id: str
    text: str
    process_id: NotRequired[str]
    iteration: NotRequired[int]


class ResultFrame(TypedDict):
    seq: int
    type: Literal["result"]
    id: str
    data: dict[str, str]
    main: bool
    display_id: NotRequired[str]
    update: NotRequired[bool]
    iteration: NotRequired[int]


class ClearOutputFrame(TypedDict):
    seq: int
    type: Literal["clear_output"]
    id: str
    wait: bool
    iteration: NotRequired[int]


class DoneFrame(TypedDict):
    """``done``: ``ok``, ``duration_ms``, ``error``? and the fields of the request's type."""

    seq: int
    type: Literal["done"]
    id: str
    ok: bool
    duration_ms: float
    error: NotRequired[ErrorInfo]


class ErrorFrame(TypedDict):
    seq: int
    type: Literal["error"]
    code: str
    message: str
    id: NotRequired[str]


class PongFrame(TypedDict):
    seq: int
    type: Literal["pong"]
    id: str


class ExitFrame(TypedDict):
    seq: int
    type: Literal["exit"]
    id: str
    process_id: str
    exit_code: int | None


class TokenFrame(TypedDict):
    seq: int
    type: Literal["token"]
    id: str
    text: str
    iteration: int


class CodeFrame(TypedDict):
    seq: int
    type: Literal["code"]
    id: str
    code: str
    language: str
    iteration: int
    block: NotRequired[int]


class AttemptFrame(TypedDict):
    seq: int
    type: Literal["attempt"]
    id: str
    iteration: int
    ok: bool
    error: NotRequired[ErrorInfo]
    duration_ms: NotRequired[float]


class GapFrame(TypedDict):
    seq: int
    type: Literal["gap"]
    missed: int
    first_missed_seq: int
    last_missed_seq: int
    message: str


class SandboxReplacedFrame(TypedDict):
    seq: int
    type: Literal["sandbox_replaced"]
    session_id: str
    state_lost: bool
    reason: str
    sandbox: dict[str, Any]
    message: str


Frame = (
    ReadyFrame
    | StdoutFrame
    | StderrFrame
    | ResultFrame
    | ClearOutputFrame
    | DoneFrame
    | ErrorFrame
    | PongFrame
    | ExitFrame
    | TokenFrame
    | CodeFrame
    | AttemptFrame
    | GapFrame
    | SandboxReplacedFrame
)
"""Any server frame."""

__all__ = [
    "AttemptFrame",
    "ClearOutputFrame",
    "CodeFrame",
    "DoneFrame",
    "ErrorFrame",
    "ErrorInfo",
    "ExitFrame",
    "Frame",
    "GapFrame",
    "PongFrame",
    "ReadyFrame",
    "ResultFrame",
    "SandboxReplacedFrame",
    "StderrFrame",
    "StdoutFrame",
    "TokenFrame",
]
