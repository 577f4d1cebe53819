"""The agent's frame stream: JSON lines out (with flow control), requests in.

The stream is a Unix socket the server listens on (``connect_channel``: its path and nonce come in the
environment; dockerd and the shim stay out of the data path), or, when there is none or it cannot be
reached, the agent's stdout and stdin (Docker's attach stream). stdin is read either way: its EOF is the
lifeline that ends the agent when the server is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import Agent

WRITE_BATCH = 256 * 1024
READ_MAX = 1 << 16  # asyncio reads 256 KiB at a time, which glibc serves with an mmap (three system calls) per read
CHANNEL_VAR = "GROUNDLOOP_CHANNEL"
NONCE_VAR = "GROUNDLOOP_CHANNEL_NONCE"


def connect_channel() -> tuple[socket.socket, str] | None:
    """The server's socket, connected, and the nonce to present; None when there is none or it refuses."""
    path = os.environ.pop(CHANNEL_VAR, None)
    nonce = os.environ.pop(NONCE_VAR, None)
    if not path or not nonce:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The server listens before the container starts: no retry. Refused means runsc without
        # --host-uds=open, or a socket that is not there: the attach stream carries the frames.
        sock.connect(path)
    except OSError as exc:
        sock.close()
        print(f"groundloop agent: data channel {path} refused ({exc}); using stdio", file=sys.stderr)
        return None
    sock.setblocking(False)
    return sock, nonce


# --------------------------------------------------------------------------
# Writing frames, with flow control towards the server.


class Out(asyncio.Protocol):
    """Write side of the agent's stdout. Pauses every output pipe when full.

    Frames sent by one callback inside ``with out:`` leave in one write
    (a run's result and its done, the lines of one read): every write costs a
    wake-up of Docker's copiers, so fewer writes means less CPU per request.
    """

    def __init__(self, agent: Agent):
        self.agent = agent
        self.transport: asyncio.WriteTransport | None = None
        self.paused = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.corked = 0

    def connection_made(self, transport):
        self.transport = transport
        # Pause above 1 MiB so a flooding child is stopped early.
        transport.set_write_buffer_limits(high=1 << 20, low=1 << 18)

    def pause_writing(self):
        self.paused = True
        self.agent.pause_pipes()

    def resume_writing(self):
        self.paused = False
        self.agent.resume_pipes()

    def connection_lost(self, exc):
        self.agent.stdout_lost()

    @staticmethod
    def encode(obj: dict) -> bytes:
        """One frame: compact JSON and its newline."""
        # allow_nan=False: the server reads strict JSON, and a bare NaN would cost the whole sandbox.
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return data.encode("utf-8", "replace") + b"\n"

    def send(self, obj: dict) -> None:
        self.send_raw(self.encode(obj))

    def send_raw(self, data: bytes) -> None:
        """Send one frame already encoded (a JSON object and its newline)."""
        self.pending.append(data)
        self.pending_bytes += len(data)
        if not self.corked or self.pending_bytes >= WRITE_BATCH:
            self.flush()

    def __enter__(self) -> Out:
        """Hold frames until the block ends (callbacks that may send several)."""
        self.corked += 1
        return self

    def __exit__(self, *exc) -> None:
        self.corked -= 1
        if not self.corked:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class Duplex(Out):
    """Both ways on the socket: frames out as ``Out``, requests in as ``In``."""

    def __init__(self, agent: Agent):
        super().__init__(agent)
        self.inbound = In(agent)

    def connection_made(self, transport):
        super().connection_made(transport)
        if isinstance(getattr(transport, "max_size", None), int):
            transport.max_size = READ_MAX

    def data_received(self, data: bytes) -> None:
        self.inbound.data_received(data)

    def eof_received(self):
        self.agent.stopping.set()
        return False


class In(asyncio.Protocol):
    """Read side of the agent's stdin: every complete line is handed to the agent at once."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        with self.agent.out:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        buf = self.buf
        if not buf and data.endswith(b"\n") and data.count(b"\n") == 1:
            self.agent.on_line(data)  # the common case: one whole frame
            return
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self.agent.on_line(bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]

    def eof_received(self):
        self.agent.stopping.set()
        return False

    def connection_lost(self, exc):
        self.agent.stopping.set()
