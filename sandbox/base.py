"""A live sandbox: the server's end of one agent connection.

``Sandbox`` is transport-agnostic: it gets an asyncio stream pair that carries
the agent's NDJSON frames (for Docker, wrapped in the attach multiplexing),
and offers ``request()``: send one op, stream its events to a callback,
return its ``done``. Many requests run at once, told apart by ``rid``.
A Docker sandbox may also be offered a direct socket (``offer_socket``,
sandbox/channel.py): when the agent connects to it, the frames take it both
ways and the first stream stays as the lifeline and the agent's stderr.

Backpressure: the callback is awaited inside the one reader task, so a slow
consumer stops the reading of the agent's stream, which in turn makes the
agent stop reading its children's pipes. Nothing in between grows unbounded.

Everything from the agent is untrusted: it shares its container with the code
it runs. A frame longer than ``max_frame_bytes``, or one that is not an agent
event of the right shape (``framing.check_event``), loses the sandbox (every
request in flight ends with SandboxLost); a ``done`` carries only the fields
the protocol knows, and only the first for a request counts. The container's
stderr reaches the server's log escaped and rate-limited.

Exceptions::

    SandboxError                  (protocol code: sandbox_unavailable)
    ├── SandboxUnavailable        could not start or reach a sandbox
    └── SandboxLost               the sandbox died or hung under a request
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import framing

if TYPE_CHECKING:
    from .channel import SocketOffer

log = logging.getLogger("groundloop.sandbox")

DRAIN_ABOVE = 1 << 20  # bytes queued towards the agent before a sender waits
DEFAULT_MAX_FRAME = 64 << 20  # without settings; backends pass SandboxSettings.max_frame_bytes
LOG_LINE_MAX = 1000  # characters of one line of the sandbox's stderr (or log event) in the server's log
LOG_BURST = 200  # lines of it logged at once, then LOG_RATE a second
LOG_RATE = 20.0
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class SandboxError(Exception):
    code = "sandbox_unavailable"
    name = "SandboxError"


class SandboxUnavailable(SandboxError):
    name = "SandboxUnavailable"


class SandboxLost(SandboxError):
    name = "SandboxLost"


def _escape(text: str) -> str:
    """A line for the server's log: control characters (ANSI escapes, carriage returns) shown, not sent."""
    if len(text) > LOG_LINE_MAX:
        text = text[:LOG_LINE_MAX] + f"... [{len(text) - LOG_LINE_MAX} more characters]"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _LogBudget:
    """A token bucket of log lines: the sandbox's stderr must not flood the server's log."""

    def __init__(self, burst: int = LOG_BURST, rate: float = LOG_RATE):
        self.burst = burst
        self.rate = rate
        self.tokens = float(burst)
        self.at = time.monotonic()
        self.dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class State(enum.IntEnum):
    STARTING = 0
    READY = 1
    LOST = 2  # the agent stream ended by itself; close() still releases the container
    CLOSING = 3
    CLOSED = 4


class _Pending:
    __slots__ = ("future", "on_event", "on_done")

    def __init__(self, on_event: EventHandler | None, on_done: Callable[[dict[str, Any]], None] | None):
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.on_event = on_event
        self.on_done = on_done


class Sandbox:
    """One agent connection. Created by a backend, handed out by the pool."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        session_id: str,
        backend: str,
        runtime: str,
        image: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        docker_mux: bool,
        closer: Callable[[Sandbox], Awaitable[None]] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
    ):
        self.id = sandbox_id
        self.session_id = session_id
        self.backend = backend
        self.runtime = runtime
        self.image = image
        self.warm = False
        self.workspace: str | None = None  # the host directory bound at /workspace, if any
        self.state = State.STARTING
        self.hello: dict[str, Any] = {}
        self.created = time.monotonic()
        self.lost_reason: str | None = None
        self._writer = writer  # where frames to the agent go: the first stream, or the socket once connected
        self._lifeline = writer
        # "attach" (Docker's attach stream), "stdio" (the local backend's pipes) or "socket" (sandbox/channel.py)
        self.channel = "attach" if docker_mux else "stdio"
        self._offer: SocketOffer | None = None
        self._accept_task: asyncio.Task | None = None
        self._socket_task: asyncio.Task | None = None
        self.max_frame_bytes = max_frame_bytes
        self._demux = framing.DockerDemux(max_frame_bytes) if docker_mux else None
        self._lines = framing.LineSplitter(max_frame_bytes)
        self._log_budget = _LogBudget()
        self._pending: dict[str, _Pending] = {}
        self._rids = itertools.count(1)
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._listener: EventHandler | None = None
        self._closer = closer
        self.egress: Any = None  # its EgressGate (sandbox/egress.py), when egress is on
        self.run_dir: str | None = None  # its host directory (sandbox/rundir.py), when it has one
        self._closed = asyncio.Event()
        self._task = asyncio.create_task(self._read_loop(reader, self._demux), name=f"sandbox-reader-{sandbox_id[:12]}")

    # ---- life cycle

    def transition(self, new: State) -> None:
        if new < self.state:
            raise RuntimeError(f"sandbox {self.id[:12]}: expected a state after {self.state.name}, got {new.name}")
        self.state = new

    async def handshake_or_close(self, timeout_s: float) -> None:
        """The backends' start: the agent's hello within ``timeout_s``, or the sandbox is closed (removed)."""
        try:
            await self.handshake(timeout_s)
        except BaseException:
            await self.close()
            raise

    async def handshake(self, timeout: float) -> dict[str, Any]:
        """Wait for the agent's hello."""
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            raise SandboxUnavailable(f"the sandbox agent did not say hello within {timeout:g} s") from None
        if self._accept_task is not None and not self._accept_task.done():
            # The agent said hello on its stdout: it could not connect, and the attach stream carries the data.
            self._accept_task.cancel()
        if self._offer is not None:
            self._offer.close()
        self.transition(State.READY)
        return self.hello

    def offer_socket(self, offer: SocketOffer) -> None:
        """Accept the agent's connection on ``offer`` while the handshake waits: if the agent connects, it
        says hello on the socket, and the socket carries every frame from then on."""
        self._offer = offer
        self._accept_task = asyncio.create_task(self._accept(offer), name=f"sandbox-accept-{self.id[:12]}")

    async def _accept(self, offer: SocketOffer) -> None:
        try:
            reader, writer = await offer.accept(limit=1 << 20)
        except (framing.FramingError, OSError) as exc:
            await self._ended(f"the sandbox's data channel failed: {exc}")
            return
        self._writer = writer
        self.channel = "socket"
        self._socket_task = asyncio.create_task(self._read_loop(reader, None), name=f"sandbox-socket-{self.id[:12]}")

    @property
    def alive(self) -> bool:
        return self.state == State.READY

    def set_listener(self, listener: EventHandler | None) -> None:
        """Receive events that belong to no request: pout, pexit, log, lost."""
        self._listener = listener

    async def close(self) -> None:
        """Stop the agent and release the container. Idempotent."""
        if self.state >= State.CLOSING:
            await self._closed.wait()
            return
        self.transition(State.CLOSING)
        if self._offer is not None:
            self._offer.close()
        for writer in {self._writer, self._lifeline}:
            try:
                writer.close()
                # close() waits for the write buffer to drain before the socket goes: a stream the agent no
                # longer reads (the attach stream beside the socket channel, a dead container) would keep its
                # descriptor until the garbage collector found it. The sandbox is going: nothing is left to say.
                writer.transport.abort()
            except Exception:  # pragma: no cover - transport already gone
                pass
        for task in (self._accept_task, self._socket_task, self._task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(SandboxLost("the sandbox was closed"))
        try:
            if self._closer is not None:
                await self._closer(self)
        finally:
            self.state = State.CLOSED
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ---- requests

    async def request(
        self,
        op: str,
        params: dict[str, Any] | None = None,
        on_event: EventHandler | None = None,
        *,
        rid: str | None = None,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Run one op. ``on_event`` gets its out/result events; returns its done.

        ``deadline_s`` is the server's own guard: an agent that has not
        answered by then is taken as hung, and the sandbox is closed.
        """
        fut = self.submit(op, params, on_event, rid=rid, deadline_s=deadline_s)
        await self.drain()
        return await fut

    def submit(
        self,
        op: str,
        params: dict[str, Any] | None = None,
        on_event: EventHandler | None = None,
        *,
        rid: str | None = None,
        deadline_s: float | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """Send one op now; the returned future gets its done (or SandboxLost).

        ``on_done``, if given, is called with the done by the reader itself, in
        the turn of the loop that read it, before the future resolves. The
        caller awaits ``drain()`` when it sends much.
        """
        if self.state != State.READY:
            raise SandboxLost(self.lost_reason or "the sandbox is not running")
        rid = rid or f"r{next(self._rids)}"
        pending = _Pending(on_event, on_done)
        frame: dict[str, Any] = {"op": op, "rid": rid}
        if params:
            frame.update(params)
        # The agent holds each answer to this bound (a larger done becomes an error), and so do we.
        frame["max_frame_bytes"] = self.max_frame_bytes
        try:
            self._writer.write(framing.encode(frame))
        except (ConnectionError, RuntimeError) as exc:
            raise SandboxLost(f"the sandbox stream is closed: {exc}") from None
        self._pending[rid] = pending
        fut = pending.future
        timer = (
            asyncio.get_running_loop().call_later(deadline_s, self._hung, fut, op, deadline_s)
            if deadline_s is not None
            else None
        )

        def forget(_: asyncio.Future) -> None:
            if timer is not None:
                timer.cancel()
            if self._pending.get(rid) is pending:
                del self._pending[rid]

        fut.add_done_callback(forget)
        return fut

    async def drain(self) -> None:
        """Wait while the stream to the agent holds more than its high water mark."""
        transport = self._writer.transport
        if transport.get_write_buffer_size() > DRAIN_ABOVE and not transport.is_closing():
            try:
                await self._writer.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise SandboxLost(f"the sandbox stream is closed: {exc}") from None

    def _hung(self, fut: asyncio.Future, op: str, deadline_s: float) -> None:
        if fut.done():
            return
        self.lost_reason = f"the sandbox did not answer a {op} within {deadline_s:g} s"
        log.warning("sandbox %s hung: %s", self.id[:12], self.lost_reason)
        fut.set_exception(SandboxLost(self.lost_reason))
        fut.exception()  # retrieved: a caller that gave up must not leave a warning behind
        asyncio.get_running_loop().create_task(self.close())

    def cancel(self, rid: str) -> None:
        """Ask the agent to interrupt request ``rid`` (SIGINT, then kill)."""
        if self.state == State.READY:
            try:
                self._writer.write(framing.encode({"op": "cancel", "target": rid}))
            except (ConnectionError, RuntimeError):
                pass

    # ---- reading

    async def _read_loop(self, reader: asyncio.StreamReader, demux: framing.DockerDemux | None) -> None:
        """Read one stream until it ends; either stream ending (the socket, or the lifeline) loses the sandbox."""
        reason = "the sandbox stream ended" if demux is not None or self.channel != "socket" else "the socket ended"
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                if demux is not None:
                    for stream, payload in demux.feed(data):
                        if stream == framing.STDERR or self.channel == "socket":
                            # With the socket, the agent writes nothing on its stdout: what comes there was
                            # written by the code through /proc/<agent>/fd/1 (gVisor lets it, docs/security.md
                            # item 5), and goes to the log like stderr, never into the frame stream.
                            for line in payload.decode("utf-8", "replace").splitlines():
                                self._log_line(line)
                        else:
                            await self._on_bytes(payload)
                else:
                    await self._on_bytes(data)
        except asyncio.CancelledError:
            reason = "the sandbox was closed"
            raise
        except (framing.FramingError, ConnectionError, OSError) as exc:
            reason = f"the sandbox stream broke: {exc}"
            log.warning("sandbox %s: %s", self.id[:12], reason)
        except Exception as exc:  # a bug in an event consumer: say so, then fail like a lost stream
            reason = f"the sandbox reader failed: {type(exc).__name__}: {exc}"
            log.exception("sandbox %s: %s", self.id[:12], reason)
        finally:
            if demux is not None and self._log_budget.dropped:
                log.warning("sandbox %s: %d lines of its stderr not logged", self.id[:12], self._log_budget.dropped)
            await self._ended(reason)

    async def _ended(self, reason: str) -> None:
        """A stream ended or broke: every request fails, and the listener hears it once."""
        self.lost_reason = self.lost_reason or reason
        self._fail_all(SandboxLost(self.lost_reason))
        if self.state < State.LOST:
            self.state = State.LOST
            if self._listener is not None:
                try:
                    await self._listener({"ev": "lost", "reason": self.lost_reason})
                except Exception:  # pragma: no cover
                    log.exception("sandbox listener failed")

    def _log_line(self, line: str) -> None:
        """One line of the sandbox's stderr (or of a log event) into the server's log, escaped, within budget."""
        budget = self._log_budget
        if not budget.take():
            return
        if budget.dropped:
            log.warning("sandbox %s: %d lines of its stderr not logged (over the rate)", self.id[:12], budget.dropped)
            budget.dropped = 0
        log.info("sandbox %s agent: %s", self.id[:12], _escape(line))

    async def _on_bytes(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            if not line:
                continue
            ev = framing.check_event(framing.decode(line))
            kind = ev.get("ev")
            rid = ev.get("rid")
            if kind == "done":
                # The first done ends the request; whatever else comes for its rid is dropped.
                pending = self._pending.pop(rid, None)
                if pending is not None and not pending.future.done():
                    if pending.on_done is not None:
                        try:
                            pending.on_done(ev)
                        except Exception:  # pragma: no cover - a bug in the caller's callback
                            log.exception("sandbox %s: done callback failed", self.id[:12])
                    pending.future.set_result(ev)
            elif rid is not None:
                pending = self._pending.get(rid)
                if pending is not None and pending.on_event is not None and not pending.future.done():
                    await pending.on_event(ev)
            elif kind == "hello":
                if not self._hello.done():
                    self._hello.set_result(ev)
            elif kind == "log":  # logged here, escaped and within budget, whoever listens: never passed on raw
                for line in ev["message"].splitlines() or [""]:
                    self._log_line(line)
            elif self._listener is not None:
                await self._listener(ev)

    def _fail_all(self, exc: Exception) -> None:
        if not self._hello.done():
            self._hello.set_exception(SandboxUnavailable(str(exc)))
            self._hello.exception()  # mark retrieved
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(exc)
                pending.future.exception()


class Backend(Protocol):
    """What the pool needs of a backend."""

    name: str
    runtime: str

    async def ping(self) -> bool: ...

    async def start(self, session_id: str) -> Sandbox:
        """Start a sandbox and complete its handshake."""

    async def reap_orphans(self) -> int: ...

    async def close(self) -> None: ...
