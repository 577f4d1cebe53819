"""The floors under a round trip, measured in the same run as everything else.

A warm ``run_code`` crosses two hops that groundloop does not write: a WebSocket
server (uvicorn, uvloop, websockets' sans-I/O protocol and Starlette, as the
server runs them) and Docker's attach stream. Each is measured here doing nothing
but echo, so a table can be read against its own machine on its own day (the
timing of this machine moves by tens of percent from one run to the next):

- ``ws_echo``: a Starlette WebSocket endpoint that sends back every text frame,
  in its own uvicorn process, driven by the lean client;
- ``attach_echo``: ``cat`` in a container hardened like a sandbox, one short
  line written to its attached stdin and read back from its stdout.

``python -m bench.floors serve PORT`` runs the echo server (the bench starts it).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

from .stats import Table, summary_ms


def _echo_app():
    from groundloop.server.uvicorn_adapter import RawSendStash, set_nodelay
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(ws: WebSocket) -> None:
        set_nodelay(ws.scope)  # as the server does: uvicorn leaves Nagle on
        await ws.accept()
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await ws.send_text(msg.get("text") or "")

    return RawSendStash(Starlette(routes=[WebSocketRoute("/echo", echo)]))


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(_echo_app(), host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning", lifespan="off")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the echo server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError("the echo server did not start")


def ws_echo(table: Table, n: int) -> None:
    from .server import LeanClient, free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floors", "serve", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, proc)
        c = LeanClient(f"ws://127.0.0.1:{port}/echo", ready=False)
        try:
            text = b'{"type":"ping","id":"e1"}'
            samples = []
            for i in range(n + 20):
                t0 = time.perf_counter()
                c.send(text)
                got = c.recv()
                if i >= 20:
                    samples.append(time.perf_counter() - t0)
                assert got == text, got
        finally:
            c.close()
    finally:
        proc.terminate()
        proc.wait(30)
    s = summary_ms(samples)
    table.add(
        "floor: WebSocket echo (uvicorn + Starlette, lean client)", f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms"
    )


def attach_echo(table: Table, n: int) -> None:
    from groundloop.sandbox import framing
    from groundloop.sandbox.docker_backend import DockerBackend

    from .engine import settings

    backend = DockerBackend(settings())
    cid, sock = backend.create_and_attach("bench-floor", ["cat"])  # a sandbox's container, cat for the agent
    try:
        sock.settimeout(30)
        demux = framing.DockerDemux()
        line = b"1 + 1\n"
        samples = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            sock.sendall(line)
            got = b""
            while not got.endswith(b"\n"):
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the attach stream ended")
                for stream, payload in demux.feed(data):
                    if stream != framing.STDOUT:
                        raise RuntimeError(f"cat wrote to stream {stream}: {payload[:200]!r}")
                    got += payload
            if i >= 20:
                samples.append(time.perf_counter() - t0)
            assert got == line, got
    finally:
        sock.close()
        backend.remove(cid)
        backend.client.close()
    s = summary_ms(samples)
    table.add("floor: echo through a container's attach stream (cat)", f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms")


def machine() -> str:
    """How this machine idles its CPUs: on a virtual machine, a halted virtual CPU costs a
    wake-up through the hypervisor at every hand-off between processes."""
    parts = []
    with contextlib.suppress(OSError):
        with open("/sys/devices/system/cpu/cpuidle/current_driver") as f:
            parts.append(f"cpuidle {f.read().strip()}")
    with contextlib.suppress(OSError):
        with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as f:
            parts.append(f"guest_halt_poll_ns {f.read().strip()}")
    return ", ".join(parts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.floors serve PORT")
