"""Issue 21, item 11: the handshake before authentication, over raw sockets on loopback.

A connection has ``header_timeout_s`` to send a request head, at most ``max_pending_connections``
may be sending one, an oversized head gets 431 (plain HTTP and WebSocket upgrades alike), and a
refused handshake (401/403) is not logged as an error. Each test failed on the code before the fix.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from support.env import server_settings
from support.raw_http import upgrade_head
from support.servers import run_server

pytestmark = pytest.mark.docker

WAIT = 60.0  # a bound on answers that come at once (loaded CI machine), never a measured time


def _upgrade_head(port: int, *extra: str) -> bytes:
    return upgrade_head(f"127.0.0.1:{port}", *extra)


async def _answer(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


async def test_slow_sockets_are_bounded_and_refused():
    """50 sockets that never finish their request head, against a limit of 20: before, all 50 stayed open
    and unanswered. Now 20 wait (until the header timeout) and 30 are answered 503 and closed; once the 20
    go, the server serves again."""
    settings = server_settings(max_pending_connections=20, header_timeout_s=600)
    async with run_server(settings) as srv:
        conns = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            conns.append((reader, writer))

        async def read(reader: asyncio.StreamReader) -> bytes:
            try:
                return await reader.read()
            except ConnectionResetError:
                # closed with the head's first bytes unread, the kernel may reset before the 503 is read
                return b"HTTP/1.1 503 (reset)"

        reads = [asyncio.ensure_future(read(r)) for r, _ in conns]
        answered: list[bytes] = []
        left = set(reads)

        async def thirty():
            nonlocal left
            while len(answered) < 30:
                done, left = await asyncio.wait(left, return_when=asyncio.FIRST_COMPLETED)
                answered.extend(t.result() for t in done)

        try:
            await asyncio.wait_for(thirty(), WAIT)
            pending = srv.uvicorn.config.http_protocol_class.pending  # sockets still sending their head
            assert len(answered) == 30 and all(a.startswith(b"HTTP/1.1 503 ") for a in answered)
            assert not any(t.done() for t in left) and len(pending) == 20
            async with httpx.AsyncClient(base_url=srv.http, timeout=WAIT) as h:
                assert (await h.get("/healthz")).status_code == 503  # a 21st opening connection
                for _, w in conns:
                    w.close()
                while pending:
                    await asyncio.sleep(0.01)
                assert (await h.get("/healthz")).json() == {"ok": True}
        finally:
            for t in reads:
                t.cancel()
            for _, w in conns:
                w.close()


async def test_a_request_head_must_arrive_in_time():
    """Before, a socket that sent part of a head (or one byte at a time) was kept for ever; now 408 and closed."""
    async with run_server(server_settings(header_timeout_s=0.5)) as srv:
        assert (await _answer(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")).startswith(b"HTTP/1.1 408 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        trickle = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000

        async def drip():
            for byte in trickle:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        dripping = asyncio.ensure_future(drip())
        try:
            try:
                answer = await asyncio.wait_for(reader.read(), WAIT)
            except ConnectionResetError:
                # closed with the dripped bytes unread, the kernel may reset before the 408 is read
                answer = b"HTTP/1.1 408 (reset)"
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        finally:
            dripping.cancel()
            writer.close()
        async with httpx.AsyncClient(base_url=srv.http, timeout=WAIT) as h:
            assert (await h.get("/healthz")).status_code == 200  # a prompt client is served


async def test_oversized_heads_get_431():
    """A 9 KiB header line on a WebSocket upgrade got no answer at all; a head over max_header_bytes got 400."""
    async with run_server() as srv:
        big_line = "X-Big: " + "a" * 9000
        answer = await _answer(srv.port, _upgrade_head(srv.port, big_line))
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * (20 << 10) + b"\r\n"
        answer = await _answer(srv.port, head)  # no blank line: the head is incomplete and over the limit
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(_upgrade_head(srv.port, "Authorization: Bearer tok1", "X-Ok: " + "a" * 4000))
        try:
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"HTTP/1.1 101 ")
        finally:
            writer.close()


async def test_refusals_are_not_logged_as_errors(caplog):
    """Every 401/403 on the WebSocket was logged at ERROR by uvicorn ("returned without completing handshake")."""
    caplog.set_level(logging.INFO)
    async with run_server() as srv:
        assert (await _answer(srv.port, _upgrade_head(srv.port))).startswith(b"HTTP/1.1 401 ")
        forbidden = _upgrade_head(srv.port, "Authorization: Bearer tok1", "Origin: http://evil.example")
        assert (await _answer(srv.port, forbidden)).startswith(b"HTTP/1.1 403 ")
        async with httpx.AsyncClient(base_url=srv.http, timeout=WAIT) as h:
            assert (await h.post("/v1/validate-code", json={"code": "1"})).status_code == 401
    refused = [r for r in caplog.records if '"refused"' in r.getMessage()]
    assert len(refused) >= 2 and all(r.levelno <= logging.WARNING for r in refused)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
