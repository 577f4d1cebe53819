"""The direct data channel: a Unix socket from the agent to the server, past dockerd and the shim.

Through the attach stream every frame is copied four times by Go processes (dockerd and the
containerd shim, each way); that path alone cost 0.43 ms of CPU per request (docs/performance.md). A Unix
socket that the server listens on, in the sandbox's own host directory (``sandbox/rundir.py``), carries
the frames straight between the two processes instead.

The order of a start: the server makes the directory and listens on ``agent.sock`` in it *before* the
container starts, and gives the agent the socket's path and a random nonce in its environment. The agent
connects at once, sends ``{"ev":"channel","nonce":..}`` as its first line, and then its hello and every
other frame on the socket. The server accepts exactly one connection, then closes the listener and
unlinks the socket (nothing else in the sandbox can connect later: the agent connects before any code
runs), and checks the nonce before the stream reaches the sandbox reader. When the agent cannot connect
(runsc without ``--host-uds=open``, a mount that is not there) it says hello on its stdout, and the
attach stream carries the data as before.

Either way the attach stream stays: it is the lifeline (stdin is "once", so when the server's end closes,
even on SIGKILL, the agent reads EOF and the container ends) and the path of the agent's stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import socket

from . import framing
from .rundir import AGENT_SOCKET, MOUNT, RunDir

CHANNEL_VAR = "GROUNDLOOP_CHANNEL"  # the socket's path in the container
NONCE_VAR = "GROUNDLOOP_CHANNEL_NONCE"
HANDSHAKE_MAX = 4096  # bytes of the agent's first line on the socket


class SocketOffer:
    """A listening socket for one agent, and the nonce that agent must present."""

    def __init__(self, listener: socket.socket, path: str):
        self.listener: socket.socket | None = listener
        self.path = path
        self.nonce = secrets.token_hex(16)

    @classmethod
    def open(cls, rundir: RunDir) -> SocketOffer:
        return cls(rundir.listen(AGENT_SOCKET), rundir.socket_path(AGENT_SOCKET))

    def environment(self) -> dict[str, str]:
        return {CHANNEL_VAR: f"{MOUNT}/{AGENT_SOCKET}", NONCE_VAR: self.nonce}

    async def accept(self, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The agent's connection, its nonce checked (FramingError if it is not the agent's)."""
        assert self.listener is not None
        try:
            conn, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        finally:
            self.close()  # one connection only
        conn.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=limit)
        try:
            line = await reader.readuntil(b"\n")
            if len(line) > HANDSHAKE_MAX:
                raise framing.FramingError(f"expected a channel handshake of at most {HANDSHAKE_MAX} bytes")
            ev = framing.decode(line)
            nonce = ev.get("nonce")
            if ev.get("ev") != "channel" or not isinstance(nonce, str) or not hmac.compare_digest(nonce, self.nonce):
                raise framing.FramingError("expected the agent's channel handshake with this sandbox's nonce")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise framing.FramingError(f"the channel handshake broke off: {exc}") from None
        except BaseException:
            writer.close()
            raise
        return reader, writer

    def close(self) -> None:
        """Stop listening and unlink the socket. Idempotent."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
