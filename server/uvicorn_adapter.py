"""Every use of uvicorn's private objects, in one place: the one module to read when uvicorn moves.

groundloop goes under the ASGI interface for two reasons, and only here.

**Speed and the slow-consumer cut.** ASGI has no way to reach the socket, and one ``send``
call per frame:

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
silent. So tests/test_unit_connection.py runs a real uvicorn and fails when any of
these falls back: an upgrade of uvicorn that renames what is used here shows up
there, not as a slow server.

**Bounds on the handshake**, before anyone is authenticated (issue 21, item 11).
What uvicorn offers, and why it is not enough on its own:

- ``timeout_keep_alive`` runs only after a response: a connection that never
  finishes its first request head (slowloris) is kept for ever, and so is one
  that sends a keep-alive request head one byte at a time (every byte re-arms it).
- ``limit_concurrency`` counts every connection and task, the authenticated
  WebSocket sessions included, and answers 503 only once a request head has
  arrived: sockets that send nothing stay open and count.
- ``h11_max_incomplete_event_size`` caps a request head (h11 then raises its
  "431" error), but uvicorn answers every h11 error with 400.
- The websockets-sansio protocol drops the response websockets writes when it
  refuses a handshake (a header line over 8 KiB gets 431 from websockets; the
  client got nothing and waited), and it logs every denial response (our 401
  and 403) at ERROR as "returned without completing handshake".

So ``http_protocol(settings)`` makes an h11 protocol class that gives a
connection ``header_timeout_s`` to send each request head (408, then closed),
refuses a new connection while ``max_pending_connections`` are still sending
one (503, then closed), and answers an oversized head with 431; and
``GuardedWSProtocol`` fixes the two websockets-sansio points above. uvicorn takes both
classes as they are (``Config(http=..., ws=...)``): no fork of its code.

uvicorn >= 0.54 (pyproject) has everything used here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol, cast

import h11
from groundloop.sessions import logs
from groundloop.sessions.protocol import SEQ_HEAD
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

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


# ---- bounds on the handshake


class _Conn(h11.Connection):
    """Remembers the status h11 suggests for the error it raised (431 for a head over the limit)."""

    error_status = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise


def _refuse(transport: Any, status: int, reason: str, body: str) -> None:
    """Write a complete plain-text response and close; for answers before h11 has seen a request."""
    data = body.encode()
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(data), data)
    )
    transport.close()


def http_protocol(settings: Any) -> type[H11Protocol]:
    """An h11 protocol class bound to ``settings``: header timeout, pending-connection limit, 431."""
    timeout = settings.header_timeout_s
    limit = settings.max_pending_connections
    pending: set[GuardedH11Protocol] = set()  # connections sending a request head, server-wide

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.conn = _Conn(h11.SERVER, self.config.h11_max_incomplete_event_size or 16 * 1024)
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(pending) >= limit:
                logs.event("refused", logging.INFO, code="too_many_connections", client=_addr(self.client))
                _refuse(transport, 503, "Service Unavailable", "too many connections are opening; try again")
                return
            self._wait_for_head()

        def _wait_for_head(self) -> None:
            pending.add(self)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

        def _got_head(self) -> None:
            pending.discard(self)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            pending.discard(self)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logs.event("refused", logging.INFO, code="header_timeout", client=_addr(self.client))
                _refuse(self.transport, 408, "Request Timeout", f"no request head within {timeout:g} s")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A request head arrived (h11 moved on), or the socket now belongs to a WebSocket protocol.
            if self.conn.their_state is not h11.IDLE or self.transport.get_protocol() is not self:
                self._got_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._wait_for_head()  # the next keep-alive request head gets the same time

        def connection_lost(self, exc: Exception | None) -> None:
            self._got_head()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # h11 sets error_status on the connection when it refuses a head (431 when it is too large).
            if getattr(self.conn, "error_status", None) != 431:
                super().send_400_response(msg)
                return
            logs.event("refused", logging.INFO, code="header_too_large", client=_addr(self.client))
            event = h11.Response(
                status_code=431,
                headers=[(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
                reason=b"Request Header Fields Too Large",
            )
            for part in (event, h11.Data(data=b"the request head is too large"), h11.EndOfMessage()):
                self.transport.write(self.conn.send(part))
            self.transport.close()

    GuardedH11Protocol.pending = pending  # type: ignore[attr-defined]  # for introspection and tests
    return GuardedH11Protocol


class GuardedWSProtocol(WebSocketsSansIOProtocol):
    """websockets-sansio, with its refusals written and its denial responses not logged as errors."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the request (431 for a header line over 8 KiB, 400 for a malformed
            # one) and queued its response; uvicorn never writes it.
            logs.event("refused", logging.INFO, code="bad_handshake", message=str(self.conn.handshake_exc)[:200])
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # The denial response (our 401/403) is complete: the handshake is over, not missing.
            self.handshake_complete = True


def _addr(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
