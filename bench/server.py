"""Server-level benchmarks: a real `groundloop serve` subprocess, real WebSocket clients.

The server runs in its own process (as deployed), so the client's work does
not share its event loop or its GIL.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from .stats import Table, pct, summary_ms

_ids = itertools.count()


# A server removes the containers of its namespace at start: one of its own per bench run, so two
# runs on one machine do not take each other's sandboxes (a shared "bench" did: SandboxLost).
NAMESPACE = f"bench-{os.getpid()}"


def images() -> list[tuple[str, str]]:
    """(row suffix, image) of each sandbox image to measure: the one under test, and, when
    GROUNDLOOP_BENCH_BASELINE_IMAGE names one, that baseline beside it (an A/B in one run, which is
    what this shared machine's noise allows to compare)."""
    out = [("", os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest"))]
    baseline = os.environ.get("GROUNDLOOP_BENCH_BASELINE_IMAGE")
    if baseline:
        out.append((f" [baseline {baseline}]", baseline))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, pool_size: int = 2, **env: str):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        self.http = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")},
            # The image under test (a branch's own tag); every other setting is the bench's.
            "GROUNDLOOP_SANDBOX_IMAGE": os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest"),
            "GROUNDLOOP_NAMESPACE": NAMESPACE,
            "GROUNDLOOP_POOL_SIZE": str(pool_size),
            "GROUNDLOOP_MAX_SESSIONS_PER_USER": "1000",
            "GROUNDLOOP_RATE_PER_S": "1000000",
            "GROUNDLOOP_RATE_BURST": "1000000",
            "GROUNDLOOP_MAX_INFLIGHT": "1000",
            "GROUNDLOOP_MAX_OUTPUT_BYTES": str(512 << 20),
            "GROUNDLOOP_LOG_LEVEL": "warning",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "groundloop.server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await self.wait_ready(120)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 60)

    def readyz(self) -> bool:
        try:
            with urllib.request.urlopen(self.http + "/readyz", timeout=5) as r:
                # Ready takes sessions; the bench also waits for a full warm pool (pool_full).
                return r.status == 200 and bool(json.loads(r.read()).get("pool_full", True))
        except Exception:
            return False

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.readyz):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the server did not become ready")

    async def settle(self) -> None:
        """Before a clock starts behind sessions just opened: the warm pool refilled (a container start, its
        agent, zygote and spares each, about 0.3 s of CPU: the session-start rows' cost, not a request's)
        and the new zygotes up."""
        await self.wait_ready(120)
        await asyncio.sleep(1.0)

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, peak RSS bytes) of the server process."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        hwm = 0
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        return cpu, hwm


def _route(msg: dict, rid: str, on_frame) -> dict | None:
    """A frame read while request ``rid`` runs: its done is returned; its other frames go to
    ``on_frame``; frames of other requests are skipped."""
    if msg.get("id") != rid:
        return None
    if msg["type"] == "done":
        return msg
    if on_frame is not None:
        on_frame(msg)
    return None


class Client:
    """The websockets asyncio client. ``timeout``, when set, bounds the wait for each frame
    (the latency benchmarks leave it unset: a timer per frame would be measured too)."""

    def __init__(self, ws, timeout: float | None = None):
        self.ws = ws
        self.timeout = timeout

    @classmethod
    async def open(cls, url: str, token: str | None = None, timeout: float | None = None) -> tuple[Client, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(
            url, additional_headers=headers, max_size=None, compression=None, open_timeout=timeout or 120
        )
        ready = orjson.loads(await asyncio.wait_for(ws.recv(), timeout or 120))
        if ready.get("type") != "ready":
            await ws.close()
            raise RuntimeError(f"expected ready, got {ready}")
        return cls(ws, timeout), ready

    async def request(self, frame: dict, on_frame=None) -> dict:
        """Send ``frame`` with a new id; its frames go to ``on_frame``, its done is returned."""
        rid = f"b{next(_ids)}"
        frame["id"] = rid
        await self.ws.send(orjson.dumps(frame).decode())
        recv, timeout = self.ws.recv, self.timeout
        while True:
            raw = await (recv() if timeout is None else asyncio.wait_for(recv(), timeout))
            done = _route(orjson.loads(raw), rid, on_frame)
            if done is not None:
                return done

    async def close(self) -> None:
        await self.ws.close()


class LeanClient:
    """A blocking WebSocket client with no event loop, so the round trip it measures is the
    server's plus the network's, with little of its own. websockets' sans-I/O protocol makes
    the handshake and masks what it sends; what it receives is read by ``_parse``, a minimal
    reader of server frames (unmasked, unfragmented: what groundloop sends), because a
    generic parser costs more CPU per frame than the server spends making it, on the same
    two cores."""

    def __init__(self, url: str, timeout: float = 60, ready: bool = True):
        """Connect; with ``ready``, read the server's ``ready`` frame (a groundloop server)."""
        uri = parse_uri(url)
        self.sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proto = ClientProtocol(uri, max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection during the handshake")
            self.buf += data
        end = self.buf.index(b"\r\n\r\n") + 4
        self.proto.receive_data(self.buf[:end])
        self.buf = self.buf[end:]
        for ev in self.proto.events_received():
            if isinstance(ev, Response) and ev.status_code != 101:
                raise ConnectionError(f"the handshake failed: {ev.status_code}")
        self.frames: collections.deque[bytes] = collections.deque()
        self._parse()
        if ready:
            first = orjson.loads(self.recv())
            assert first["type"] == "ready", first

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def _parse(self) -> None:
        """Move every whole text frame of ``buf`` to ``frames``; answer pings; a close ends the client."""
        buf, pos, n = self.buf, 0, len(self.buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            size, at = b1 & 0x7F, pos + 2
            if size == 126:
                if n - pos < 4:
                    break
                size, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
            elif size == 127:
                if n - pos < 10:
                    break
                size, at = int.from_bytes(buf[at : at + 8], "big"), at + 8
            if b1 & 0x80 or not b0 & 0x80:
                raise ConnectionError("a masked or fragmented server frame: not for this client")
            if at + size > n:
                break
            payload, pos, opcode = buf[at : at + size], at + size, b0 & 0x0F
            if opcode == 1:
                self.frames.append(payload)
            elif opcode == 9:
                self.proto.send_pong(payload)
                self._flush()
            elif opcode == 8:
                raise ConnectionError("the server closed the connection")
        self.buf = buf[pos:]

    def recv(self) -> bytes:
        while not self.frames:
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data
            self._parse()
        return self.frames.popleft()

    def send(self, text: bytes) -> None:
        self.proto.send_text(text)
        self._flush()

    def request(self, frame: dict, on_frame=None) -> dict:
        rid = frame["id"] = f"l{next(_ids)}"
        self.send(orjson.dumps(frame))
        while True:
            done = _route(orjson.loads(self.recv()), rid, on_frame)
            if done is not None:
                return done

    def close(self) -> None:
        self.proto.send_close()
        self._flush()
        self.sock.close()


def lean_rtt(url: str, frame: dict, n: int) -> list[float]:
    c = LeanClient(url)
    try:
        c.request(dict(frame))
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            done = c.request(dict(frame))
            out.append(time.perf_counter() - t0)
            assert done["ok"], done
        return out
    finally:
        c.close()


class StdoutCount:
    """A request's frame callback that counts the characters of its stdout frames."""

    def __init__(self) -> None:
        self.chars = 0

    def __call__(self, msg: dict) -> None:
        if msg["type"] == "stdout":
            self.chars += len(msg["text"])


def lean_stream(url: str, code: str) -> tuple[int, float, dict]:
    """Run ``code`` and read every frame it causes: (stdout characters, seconds, done)."""
    c = LeanClient(url)
    try:
        count = StdoutCount()
        t0 = time.perf_counter()
        done = c.request({"type": "run_code", "code": code, "timeout_s": 300}, count)
        return count.chars, time.perf_counter() - t0, done
    finally:
        c.close()


async def rtt(client: Client, n: int, frame: dict | None = None) -> list[float]:
    """``n`` sequential round trips of ``frame`` (a ``1 + 1`` run by default)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        done = await client.request(dict(frame) if frame else {"type": "run_code", "code": "1 + 1"})
        out.append(time.perf_counter() - t0)
        assert done["ok"], done
    return out


def check_stream(chars: int, done: dict, expected: int) -> None:
    """A throughput run ended well and its client read every character."""
    assert done["ok"] and not done.get("truncated"), done
    assert chars == expected, (chars, expected)


async def run(table: Table, n: int, smoke: bool = False) -> None:
    async with Server(pool_size=2) as srv:
        # connect to ready, with the warm pool
        connect_times = []
        for _ in range(3 if smoke else 10):
            await srv.wait_ready(120)
            t0 = time.perf_counter()
            c, ready = await Client.open(srv.url)
            connect_times.append(time.perf_counter() - t0)
            assert ready["sandbox"]["warm"], ready
            await c.close()
        c, _ = await Client.open(srv.url)
        await c.request({"type": "run_code", "code": "1 + 1"})
        warm = await rtt(c, n)
        ping = await rtt(c, n, {"type": "ping"})
        # time to first stdout line
        first = []
        for _ in range(10 if smoke else 100):
            t0 = time.perf_counter()
            seen: list[float] = []

            def on_frame(msg, t0=t0, seen=seen):
                if msg["type"] == "stdout" and not seen:
                    seen.append(time.perf_counter() - t0)

            await c.request({"type": "run_code", "code": "print('hello')\nimport time\ntime.sleep(0.02)"}, on_frame)
            first.append(seen[0])
        # streaming throughput: 1 KiB lines
        mib = 4 if smoke else 64
        count = StdoutCount()
        code = f"import sys\nline = 'x' * 1023 + '\\n'\nw = sys.stdout.write\nfor _ in range({mib * 1024}): w(line)"
        t0 = time.perf_counter()
        done = await c.request({"type": "run_code", "code": code, "timeout_s": 300}, count)
        elapsed = time.perf_counter() - t0
        check_stream(count.chars, done, mib << 20)
        await c.close()
        lgot, lelapsed, ldone = await asyncio.to_thread(lean_stream, srv.url, code)
        check_stream(lgot, ldone, mib << 20)

        lean = await asyncio.to_thread(lean_rtt, srv.url, {"type": "run_code", "code": "1 + 1"}, n)
        lean_ping = await asyncio.to_thread(lean_rtt, srv.url, {"type": "ping"}, n)

        w, p, f = summary_ms(warm), summary_ms(ping), summary_ms(first)
        lw, lp = summary_ms(lean), summary_ms(lean_ping)
        table.add(
            "ws: run_code 1 + 1 round trip (warm, lean client)",
            f"p50 {lw['p50']:.3f} ms, p99 {lw['p99']:.3f} ms",
            "p50 <= 0.8 ms, p99 <= 2.5 ms",
        )
        table.add(
            "ws: run_code 1 + 1 round trip (warm, asyncio client)",
            f"p50 {w['p50']:.3f} ms, p99 {w['p99']:.3f} ms",
            "p50 <= 1 ms, p99 <= 3 ms",
        )
        table.add("ws: ping round trip (lean client)", f"p50 {lp['p50']:.3f} ms, p99 {lp['p99']:.3f} ms")
        table.add("ws: ping round trip (asyncio client)", f"p50 {p['p50']:.3f} ms, p99 {p['p99']:.3f} ms")
        table.add(
            "ws: connect to ready (warm pool)",
            f"p50 {summary_ms(connect_times)['p50']:.1f} ms, max {max(connect_times) * 1e3:.1f} ms",
            "<= 50 ms",
        )
        table.add("ws: time to first stdout line", f"p50 {f['p50']:.3f} ms, p99 {f['p99']:.3f} ms", "<= 5 ms")
        table.add(
            f"ws: stream throughput ({mib} MiB in 1 KiB lines, lean client)",
            f"{mib / lelapsed:.1f} MiB/s",
            ">= 100 MiB/s",
        )
        table.add(
            f"ws: stream throughput ({mib} MiB in 1 KiB lines, asyncio client)",
            f"{mib / elapsed:.1f} MiB/s",
            ">= 50 MiB/s",
        )

    for sessions in (4,) if smoke else (40, 200):
        await concurrent(table, sessions, per_session=5 if smoke else (50 if sessions == 40 else 10))


async def concurrent(table: Table, sessions: int, per_session: int, label: str = "", **env: str) -> None:
    """``sessions`` clients at once, each ``per_session`` requests in turn; ``env``: the server's settings."""
    from .channels import Processes, cpu_row

    async with Server(pool_size=2, **env) as srv:
        cpu0, _ = srv.usage()
        t0 = time.perf_counter()
        opened = await asyncio.gather(*(Client.open(srv.url) for _ in range(sessions)), return_exceptions=True)
        clients = [c for c, _ in (o for o in opened if not isinstance(o, BaseException))]
        errors = [o for o in opened if isinstance(o, BaseException)]
        connect_all = time.perf_counter() - t0
        await asyncio.gather(*(c.request({"type": "run_code", "code": "1 + 1"}) for c in clients))
        await srv.settle()
        assert srv.proc is not None
        procs = Processes(srv.proc.pid, srv.env["GROUNDLOOP_NAMESPACE"])
        before = await asyncio.to_thread(procs.take)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(rtt(c, per_session) for c in clients), return_exceptions=True)
        wall = time.perf_counter() - t0
        after = await asyncio.to_thread(procs.take)
        lat = [x for r in results if not isinstance(r, BaseException) for x in r]
        errors += [r for r in results if isinstance(r, BaseException)]
        cpu1, hwm = srv.usage()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        table.add(
            f"ws{label}: {sessions} concurrent sessions, run_code 1 + 1",
            f"p50 {pct(lat, 50) * 1e3:.2f} ms, p99 {pct(lat, 99) * 1e3:.2f} ms, {len(lat) / wall:.0f} req/s",
            "p99 <= 50 ms, >= 2000 req/s" if sessions == 40 else "",
        )
        table.add(
            f"ws{label}: {sessions} concurrent sessions: CPU per request, every process",
            cpu_row(before, after, len(lat)),
            "<= 1.0 ms" if sessions == 40 else "",
        )
        table.add(
            f"ws: {sessions} sessions held at once",
            f"{len(clients)} open, {len(errors)} errors, all connected in {connect_all:.1f} s",
            "no errors",
        )
        table.add(
            f"server CPU and peak memory per session ({sessions})",
            f"{(cpu1 - cpu0) / max(1, len(clients)) * 1e3:.0f} ms CPU, {hwm / max(1, len(clients)) / 1024:.0f} KiB",
        )
