"""Bounds on the HTTP handshake, before anyone is authenticated: uvicorn's protocols, with what they lack.

What uvicorn 0.54 offers, and why it is not enough on its own:

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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from groundloop.sessions import logs
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


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
