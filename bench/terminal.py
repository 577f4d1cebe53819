"""Terminal round trip: a keystroke sent as ``terminal_input`` to the time its echo arrives as ``terminal_output``.

The terminal runs the default login shell (bash), whose line editor echoes
each key, so the path measured is the one a user types through: WebSocket,
server, agent, pty, readline, pty, agent, server, WebSocket. Keys alternate
``x`` and backspace so the line stays short. A key's echo is the first
``terminal_output`` after it was sent (the shell prints nothing else while it
waits for a key); its ``done`` is not waited for.

The server runs the image of ``GROUNDLOOP_SANDBOX_IMAGE`` when it is set (the
other benchmarks' servers ignore the environment): a branch measures its own
agent without retagging ``latest``.
"""

from __future__ import annotations

import base64
import os
import time

import orjson

from .server import Client, Server
from .stats import Table, summary_ms


async def keystroke_rtt(url: str, n: int) -> list[float]:
    c, _ = await Client.open(url, timeout=120)
    ws = c.ws
    try:
        await ws.send(orjson.dumps({"type": "open_terminal", "id": "term", "cols": 80, "rows": 24}).decode())
        # Wait for the prompt: the shell has started and its line editor waits for a key.
        seen = b""
        while not seen.rstrip().endswith(b"$"):
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "terminal_output":
                seen += base64.b64decode(msg["data"])
            elif msg["type"] == "done" and msg["id"] == "term":
                raise RuntimeError(f"the terminal ended: {msg}")
        samples = []
        for i in range(n):
            key = "x" if i % 2 == 0 else "\x7f"
            frame = orjson.dumps({"type": "terminal_input", "id": f"k{i}", "terminal": "term", "data": key}).decode()
            t0 = time.perf_counter()
            await ws.send(frame)
            while True:
                msg = orjson.loads(await ws.recv())
                if msg["type"] == "terminal_output":
                    samples.append(time.perf_counter() - t0)
                    break
        await ws.send(orjson.dumps({"type": "close_terminal", "id": "close", "terminal": "term"}).decode())
        while True:
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "done" and msg["id"] == "close":
                break
        return samples
    finally:
        await c.close()


async def run(table: Table, n: int, smoke: bool = False, runtimes: tuple[str, ...] = ("runc", "runsc")) -> None:
    for runtime in runtimes:
        try:
            image = os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest")
            async with Server(
                pool_size=1,
                GROUNDLOOP_SANDBOX_RUNTIME=runtime,
                GROUNDLOOP_SANDBOX_IMAGE=image,
                GROUNDLOOP_NAMESPACE="bench-terminal",  # its start-up reaps no other run's containers
            ) as srv:
                samples = await keystroke_rtt(srv.url, min(n, 20 if smoke else 1000))
        except RuntimeError as exc:  # runsc not registered, for one
            table.add(f"ws: terminal keystroke to echo [{runtime}]", f"unavailable: {exc}"[:60])
            continue
        s = summary_ms(samples)
        table.add(
            f"ws: terminal keystroke to echo [{runtime}]",
            f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms",
            "p50 <= 5 ms",
        )
