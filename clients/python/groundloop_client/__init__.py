"""An asyncio client for groundloop: run code in a warm sandbox, stream its output.

::

    import asyncio
    from groundloop.client import connect

    async def main():
        async with connect("ws://127.0.0.1:8000/v1/ws", "tok1") as session:
            run = await session.run_code("print('hi')\\n6 * 7", on_stdout=lambda line: print(line, end=""))
            print(run.text)  # 42

    asyncio.run(main())

A dropped socket is resumed by itself; the caller sees at most a delay. See
docs/clients.md and docs/protocol.md.
"""

from __future__ import annotations

from .errors import (
    AuthError,
    ConnectError,
    GapError,
    GroundloopError,
    ProtocolError,
    RequestError,
    SessionClosed,
)
from .frames import DoneFrame, Frame
from .request import Process, Request
from .results import (
    AssistResult,
    CommandResult,
    ContextInfo,
    Error,
    Execution,
    FileEntry,
    ProcessInfo,
    Result,
)
from .session import Session, connect

__all__ = [
    "AssistResult",
    "AuthError",
    "CommandResult",
    "ConnectError",
    "ContextInfo",
    "DoneFrame",
    "Error",
    "Execution",
    "FileEntry",
    "Frame",
    "GapError",
    "GroundloopError",
    "Process",
    "ProcessInfo",
    "ProtocolError",
    "Request",
    "RequestError",
    "Result",
    "Session",
    "SessionClosed",
    "connect",
]
