"""Every use of uvicorn's private objects, in one place, each with an ASGI fallback.

The ASGI interface has no way to reach the socket, and one ``send`` call per
frame. groundloop goes under it in three places, for speed and for the
slow-consumer cut; all of them go through this module:

1. ``RawSendStash`` (ASGI middleware) keeps the server's own ``send`` in the
   scope (``RAW_SEND``). It is a bound method of uvicorn's protocol object.
2. ``transport_of(scope)``: that object's asyncio transport, for
   ``set_nodelay`` (TCP_NODELAY on the socket) and ``abort`` (a client that
   stops reading leaves the server's send paused, so a close frame cannot be
   written: the transport is aborted instead).
3. ``batch_writer(send)``: with uvicorn's ``websockets-sansio`` protocol (what
   groundloop runs, server/app.py ``uvicorn_config``), write many outbox frames
   with one transport write, framed here (no extension is negotiated:
   compression is off) instead of one ``send`` per frame.

Each returns None (or does nothing) when uvicorn's objects are not what it
expects, and the caller falls back to plain ASGI: correct, but slower, and
silent. So tests/server/test_unit_connection.py runs a real uvicorn and fails when any of
these falls back: an upgrade of uvicorn that renames what is used here shows up
there, not as a slow server. uvicorn >= 0.35 (pyproject) has what it needs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol, cast

from groundloop.sessions.protocol import SEQ_HEAD

RAW_SEND = "groundloop.raw_send"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

# What batch_writer uses of uvicorn's WebSocketsSansIOProtocol and of its websockets ServerProtocol.
_PROTOCOL_ATTRS = ("writable", "close_sent", "transport")
_CONN_ATTRS = ("send_text", "data_to_send", "state", "extensions")


class OutFrame(Protocol):
    """An outbox frame (sessions/outbox.py): ``seq``, its encoded ``rest``, and the whole ``wire()``."""

    seq: int
    rest: bytes

    def wire(self) -> bytes: ...


BatchWriter = Callable[[Sequence[OutFrame]], Awaitable[tuple[int, int]]]


class RawSendStash:
    """ASGI middleware: keep the server's own ``send`` in the scope, to reach the transport."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def _protocol(send: Any) -> Any:
    """uvicorn's protocol object behind its ASGI ``send`` (a bound method of it), or None."""
    return getattr(send, "__self__", None)


def transport_of(scope: Scope) -> asyncio.Transport | None:
    """The connection's asyncio transport, or None (not uvicorn, or no RawSendStash)."""
    transport = getattr(_protocol(scope.get(RAW_SEND)), "transport", None)
    # Duck-typed: uvloop's transports are not asyncio's classes.
    if transport is None or not hasattr(transport, "abort") or not hasattr(transport, "get_extra_info"):
        return None
    return cast(asyncio.Transport, transport)


def set_nodelay(scope: Scope) -> bool:
    """Small frames go out at once. asyncio sets TCP_NODELAY only on sockets made with
    proto IPPROTO_TCP, which uvicorn's are not: without it Nagle and delayed ACKs add 40 ms
    to every request/response exchange. True when it is set."""
    transport = transport_of(scope)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover
        return False
    return True


def abort(scope: Scope) -> bool:
    """Drop the connection at once (no close frame); False when the transport cannot be reached."""
    transport = transport_of(scope)
    if transport is None:
        return False
    transport.abort()
    return True


_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack


def text_header(n: int) -> bytes:
    """The header of an unmasked, final text frame of n bytes (RFC 6455 section 5.2)."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return _HEAD16(0x81, 126, n)
    return _HEAD64(0x81, 127, n)


def batch_writer(send: Any) -> BatchWriter | None:
    """A way to write many text frames with one transport write, when ``send`` is uvicorn's
    websockets-sansio protocol's; None otherwise (frames then go one by one through ``send``).

    With no extension negotiated (groundloop turns compression off), a server's text frame
    is a header and the payload, so frames are framed here, without a call per frame into
    the protocol object; with an extension they go through it.
    """
    proto = _protocol(send)
    conn = getattr(proto, "conn", None)
    if proto is None or conn is None:
        return None
    if not all(hasattr(proto, a) for a in _PROTOCOL_ATTRS) or not all(hasattr(conn, a) for a in _CONN_ATTRS):
        return None
    if not isinstance(proto.writable, asyncio.Event):
        return None

    async def write_all(frames: Sequence[OutFrame]) -> tuple[int, int]:
        """Write outbox frames (``{"seq":N,`` and each one's ``rest``), with one copy. Returns the
        bytes of the frames' payloads and of their rests."""
        await proto.writable.wait()  # the transport's flow control, as uvicorn's own send
        if proto.close_sent or proto.transport.is_closing() or conn.state.name != "OPEN":
            raise ConnectionError("the connection is closing")
        size = rests = 0
        if conn.extensions:
            for f in frames:
                wire = f.wire()
                conn.send_text(wire)
                size += len(wire)
                rests += len(f.rest)
            proto.transport.write(b"".join(conn.data_to_send()))
            return size, rests
        parts: list[bytes] = []
        append = parts.append
        for f in frames:
            head = SEQ_HEAD % f.seq
            rest = f.rest
            k = len(rest)
            n = len(head) + k
            append(text_header(n))
            append(head)
            append(rest)
            size += n
            rests += k
        proto.transport.write(b"".join(parts))
        return size, rests

    return write_all
