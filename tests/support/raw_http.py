"""Raw HTTP on loopback sockets, for the tests that must send what a well-behaved client would not."""

from __future__ import annotations

import base64
import os


def upgrade_head(host: str, *extra: str) -> bytes:
    """A WebSocket upgrade request head for /v1/ws with this ``Host`` and any extra header lines."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /v1/ws HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {key}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
