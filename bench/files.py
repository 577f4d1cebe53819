"""Live files: watch latency (a write in the sandbox to its ``file_event`` at the client) and the
throughput of chunked upload and download, over a real ``groundloop serve`` and real Docker.

Watch latency: a program in the sandbox creates files whose names carry the
wall-clock time of their creation (``t-<ns>``), one every 20 ms; the client
takes its own wall clock when the ``file_event`` arrives. The container reads
the host's clock (runc: the same kernel; runsc: gVisor's clock follows the
host's), so the difference is write -> inotify -> agent -> server -> client.
New files are never held by the coalescing window (only repeated changes of
one path are), so this is the latency of a first change.

Runtimes: ``GROUNDLOOP_BENCH_RUNTIMES`` (as bench/hostile.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

import orjson

from .hostile import _runtimes
from .server import Client, Server
from .stats import Table, summary_ms

QUIET_S = 60.0  # no event for this long: the bench says what it got instead of waiting for the idle reaper
WRITER = """import os, sys, time
n = int(sys.argv[1])
for i in range(n):
    time.sleep(0.02)
    os.close(os.open(f"lat/t-{time.time_ns()}", os.O_CREAT | os.O_WRONLY, 0o644))
"""


async def _send(c: Client, frame: dict) -> None:
    await c.ws.send(orjson.dumps(frame).decode())


async def watch_latency(c: Client, count: int) -> list[float]:
    await c.request({"type": "exec", "command": "mkdir -p lat"})
    await c.request({"type": "write_file", "path": "writer.py", "content": WRITER})
    await _send(c, {"type": "watch_files", "id": "watch", "path": "lat"})
    while True:
        f = orjson.loads(await c.ws.recv())
        if f.get("id") == "watch":
            assert f["type"] == "watching", f
            break
    await _send(c, {"type": "start_process", "id": "writer", "command": f"python3 writer.py {count}"})
    samples: list[float] = []
    others: list[dict] = []  # what else came: an overflow, the writer's output or exit
    while len(samples) < count:
        try:
            raw = await asyncio.wait_for(c.ws.recv(), QUIET_S)
        except TimeoutError:
            raise RuntimeError(f"{len(samples)} of {count} created events, then none for {QUIET_S:g} s: {others[-5:]}")
        now = time.time_ns()
        f = orjson.loads(raw)
        if f.get("type") == "file_event" and f.get("kind") == "created":
            name = f["path"].rsplit("/", 1)[-1]
            samples.append((now - int(name[2:])) / 1e9)
        else:
            others.append(f)
    await _send(c, {"type": "cancel", "id": "cancel-watch", "target": "watch"})
    while True:
        f = orjson.loads(await c.ws.recv())
        if f.get("id") == "watch" and f["type"] == "done":
            return samples


async def transfer(c: Client, size: int, chunk: int) -> tuple[float, float]:
    """Seconds to upload ``size`` bytes in chunks of ``chunk``, and to download them."""
    data = os.urandom(size)
    t0 = time.perf_counter()
    await _send(c, {"type": "upload_file", "id": "up", "path": "bench.bin", "size": size})
    for off in range(0, size, chunk):
        part = base64.b64encode(data[off : off + chunk]).decode()
        done = await c.request({"type": "upload_chunk", "upload": "up", "offset": off, "content": part})
        assert done["ok"], done
    while True:
        f = orjson.loads(await c.ws.recv())
        if f.get("id") == "up" and f["type"] == "done":
            assert f["ok"], f
            break
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts: list[bytes] = []
    done = await c.request(
        {"type": "download_file", "path": "bench.bin", "chunk_bytes": chunk},
        lambda f: parts.append(base64.b64decode(f["content"])) if f["type"] == "file_chunk" else None,
    )
    down = time.perf_counter() - t0
    assert done["ok"] and b"".join(parts) == data, done
    return up, down


async def run(table: Table, n: int, smoke: bool = False) -> None:
    count = 20 if smoke else min(n, 500)
    size = (2 if smoke else 16) << 20
    image = {k: v for k, v in os.environ.items() if k == "GROUNDLOOP_SANDBOX_IMAGE"}
    for runtime in _runtimes():
        async with Server(
            pool_size=1, GROUNDLOOP_SANDBOX_RUNTIME=runtime, GROUNDLOOP_MAX_FILE_BYTES=str(size), **image
        ) as srv:
            c, _ = await Client.open(srv.url, timeout=120)
            try:
                s = summary_ms(await watch_latency(c, count))
                table.add(
                    f"files[{runtime}]: watch latency, write to file_event",
                    f"p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms (n={s['n']})",
                    "p50 < 50 ms",
                )
                up, down = await transfer(c, size, 1 << 20)
                mib = size / (1 << 20)
                table.add(
                    f"files[{runtime}]: {mib:.0f} MiB upload / download, 1 MiB chunks",
                    f"{mib / up:.0f} / {mib / down:.0f} MiB/s",
                )
            finally:
                await c.close()
