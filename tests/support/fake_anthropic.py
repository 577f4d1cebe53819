"""A local stand-in of the Anthropic Messages API (``POST /v1/messages``), for tests.

A real HTTP/1.1 server on 127.0.0.1 (stdlib ``asyncio.start_server``, one
request per connection, chunked responses) that the real ``anthropic`` SDK
talks to through ``AsyncAnthropic(base_url=fake.url, api_key="test")``.

Each request pops the next scripted ``Reply``:

- a streamed reply sends the server-sent events in the order the public API
  documents them: ``message_start``, ``content_block_start`` (text),
  ``ping``, one ``content_block_delta`` with a ``text_delta`` per text chunk,
  ``content_block_stop``, ``message_delta`` (``stop_reason``, ``usage``),
  ``message_stop``; with ``stream_error`` set, an ``error`` event is sent
  after the chunks instead of the end of the message; with ``drop`` set, the
  connection is cut there (a network failure);
- an error reply answers with an HTTP status (529 overloaded, 429 rate
  limited, 401 authentication...) and the documented JSON error body
  ``{"type":"error","error":{"type":...,"message":...},"request_id":...}``.

A chunk is a string (one text delta), a ``Delay`` (the model pauses), or a
``Gate`` (the stream waits until the test sets an event, or ``timeout_s``
passes). Every request body is recorded in ``requests`` so tests can check
what the SDK sent, and ``disconnected`` is set when a client closes a stream
before its end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    529: "Overloaded",
}


@dataclass
class Delay:
    seconds: float


@dataclass
class Gate:
    """Hold the stream until ``event`` is set (or ``timeout_s`` passes)."""

    event: asyncio.Event
    timeout_s: float = 30.0


@dataclass
class Reply:
    chunks: list[Any] = field(default_factory=list)
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    stream_error: str | None = None  # an error event type sent mid-stream
    stop_reason: str = "end_turn"
    input_tokens: int | None = None
    drop: bool = False  # hang up after the chunks, mid-message (a network failure)


def text(*chunks: Any, stop_reason: str = "end_turn") -> Reply:
    return Reply(list(chunks), stop_reason=stop_reason)


def http_error(status: int, message: str | None = None, error_type: str | None = None) -> Reply:
    return Reply(status=status, error_type=error_type or ERROR_TYPES.get(status, "api_error"), error_message=message)


def stream_error(*chunks: Any, error_type: str = "overloaded_error", message: str = "Overloaded") -> Reply:
    return Reply(list(chunks), stream_error=error_type, error_message=message)


def dropped(*chunks: Any) -> Reply:
    return Reply(list(chunks), drop=True)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class FakeAnthropic:
    """``async with FakeAnthropic([replies...]) as fake: ... fake.url ... fake.requests``."""

    def __init__(self, replies: list[Reply] | None = None):
        self.replies: deque[Reply] = deque(replies or [])
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected = asyncio.Event()
        self.completed = 0
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)
        self._handlers: set[asyncio.Task] = set()
        self.url = ""

    def add(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def __aenter__(self) -> FakeAnthropic:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    # ---- HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnected.set()
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method != "POST" or not path.split("?")[0].endswith("/v1/messages"):
            await self._json(
                writer,
                404,
                {"type": "error", "error": {"type": "not_found_error", "message": f"no route {method} {path}"}},
            )
            return
        request = json.loads(body)
        self.requests.append(request)
        self.headers.append(headers)
        if not self.replies:
            await self._json(
                writer,
                500,
                {"type": "error", "error": {"type": "api_error", "message": "the fake has no scripted reply left"}},
            )
            return
        reply = self.replies.popleft()
        if reply.status != 200:
            await self._json(
                writer,
                reply.status,
                {
                    "type": "error",
                    "error": {
                        "type": reply.error_type,
                        "message": reply.error_message or REASONS.get(reply.status, "error"),
                    },
                    "request_id": f"req_fake{next(self._ids)}",
                },
                extra={"retry-after-ms": "10", "x-should-retry": "true"} if reply.status in (429, 529) else None,
            )
            return
        await self._stream(reader, writer, request, reply)

    async def _json(
        self, writer: asyncio.StreamWriter, status: int, obj: dict, extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(obj).encode()
        hdrs = {
            "content-type": "application/json",
            "content-length": str(len(data)),
            "connection": "close",
            "request-id": f"req_fake{next(self._ids)}",
        }
        hdrs.update(extra or {})
        writer.write(self._head(status, hdrs) + data)
        await writer.drain()

    @staticmethod
    def _head(status: int, headers: dict[str, str]) -> bytes:
        out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        out += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict, reply: Reply
    ) -> None:
        writer.write(
            self._head(
                200,
                {
                    "content-type": "text/event-stream; charset=utf-8",
                    "cache-control": "no-cache",
                    "transfer-encoding": "chunked",
                    "connection": "close",
                    "request-id": f"req_fake{next(self._ids)}",
                },
            )
        )
        # The client sends nothing more on this connection: EOF means it hung up.
        gone = asyncio.ensure_future(reader.read(1))

        async def send(chunk: bytes) -> None:
            if gone.done():
                raise ConnectionResetError("client disconnected")
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()

        try:
            n_in = reply.input_tokens or max(1, len(json.dumps(request.get("messages", []))) // 4)
            n_out = 0
            await send(
                _sse(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": f"msg_fake{next(self._ids)}",
                            "type": "message",
                            "role": "assistant",
                            "content": [],
                            "model": request.get("model", "claude-fake"),
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": {"input_tokens": n_in, "output_tokens": 1},
                        },
                    },
                )
            )
            await send(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                )
            )
            await send(_sse("ping", {"type": "ping"}))
            for chunk in reply.chunks:
                if isinstance(chunk, Delay):
                    await self._wait(gone, asyncio.sleep(chunk.seconds), None)
                elif isinstance(chunk, Gate):
                    await self._wait(gone, chunk.event.wait(), chunk.timeout_s)
                else:
                    n_out += 1
                    await send(
                        _sse(
                            "content_block_delta",
                            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": chunk}},
                        )
                    )
            if reply.drop:
                writer.transport.abort()
                return
            if reply.stream_error:
                await send(
                    _sse(
                        "error",
                        {
                            "type": "error",
                            "error": {"type": reply.stream_error, "message": reply.error_message or "error"},
                        },
                    )
                )
            else:
                await send(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
                await send(
                    _sse(
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                            "usage": {"output_tokens": max(1, n_out)},
                        },
                    )
                )
                await send(_sse("message_stop", {"type": "message_stop"}))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.completed += 1
        finally:
            gone.cancel()

    async def _wait(self, gone: asyncio.Future, aw: Any, timeout: float | None) -> None:
        waiter = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({gone, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if gone in done:
            raise ConnectionResetError("client disconnected")
