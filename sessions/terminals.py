"""Terminals on the session side: how the four terminal requests become agent ops, and their output frames.

A terminal is the ``open_terminal`` request itself: it stays in flight while
the terminal lives, its output arrives as ``terminal_output`` frames with its
id (so the outbox replays them on resume like any other frame), and its
``done`` (with ``exit_code``) says the terminal ended. The other three
requests name it by that id in ``terminal``.

The agent names a terminal by a key made of the request id: its JSON text, so
that the string ``"1"`` and the integer ``1`` stay two terminals. Ids are
unique among the requests in flight, and a terminal's request is in flight
as long as the terminal is open, so keys are unique among open terminals.
Nothing is kept here: a key of a terminal that is gone reaches the agent,
which answers ``TerminalNotFound``.
"""

from __future__ import annotations

from typing import Any

import orjson
from groundloop.sandbox.settings import SandboxSettings

TERMINAL_OPS = frozenset({"open_terminal", "terminal_input", "resize_terminal", "close_terminal"})


def terminal_key(request_id: Any) -> str:
    return orjson.dumps(request_id).decode()


def terminal_params(op: str, request_id: Any, params: dict[str, Any], sb: SandboxSettings) -> float | None:
    """Fill in the agent's parameters of a terminal op (in place); return its deadline (None: none)."""
    if op == "open_terminal":
        params["terminal"] = terminal_key(request_id)
        params["max_terminals"] = sb.max_terminals
        return None  # it runs as long as the terminal is open
    params["terminal"] = terminal_key(params["terminal"])
    return max(sb.exec_timeout_s, 30.0) + 10


def terminal_output_frame(id: Any, data: str) -> dict[str, Any]:
    """``data``: the bytes the program wrote, base64 (the agent encodes them; passed on as they are)."""
    return {"type": "terminal_output", "id": id, "data": data}
