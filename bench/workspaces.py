"""`python -m bench.workspaces [--runtime runsc] [-n N]`: what a named workspace costs (docs/workspaces.md).

A real `groundloop serve` (bench/server.py) with a workspace root in a temporary directory:
connect-to-ready of a session from the warm pool against one with `?workspace=` (always a new
container), and the times of `snapshot` and `restore` (a helper container each) of a small tree.
Loop mode needs root; without it the server measures usage instead, and the table says which.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time

import orjson
from websockets.asyncio.client import connect

from .server import Server
from .stats import Table, summary_ms


async def _session(url: str) -> tuple[float, object]:
    t0 = time.perf_counter()
    ws = await connect(url, max_size=None, compression=None)
    ready = orjson.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return time.perf_counter() - t0, ws


async def _call(ws, rid: str, **req) -> dict:
    await ws.send(orjson.dumps({"id": rid, **req}).decode())
    while True:
        frame = orjson.loads(await ws.recv())
        if frame.get("id") == rid and frame["type"] == "done":
            assert frame["ok"], frame
            return frame


def _ms(samples: list[float]) -> str:
    s = summary_ms(samples)
    return f"p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms (n={s['n']})"


async def run(table: Table, n: int, runtime: str, image: str | None) -> None:
    root = tempfile.mkdtemp(prefix="groundloop-bench-ws-")
    env = {"GROUNDLOOP_WORKSPACE_DIR": root, "GROUNDLOOP_SANDBOX_RUNTIME": runtime}
    if image:
        env["GROUNDLOOP_SANDBOX_IMAGE"] = image
    pool: list[float] = []
    named: list[float] = []
    snap: list[float] = []
    restore: list[float] = []
    try:
        async with Server(pool_size=1, **env) as srv:
            mode = await _measure(srv, n, pool, named, snap, restore)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the server unmounted the user's image at its exit
    table.add(f"connect to ready, warm pool ({runtime})", _ms(pool))
    table.add(f"connect to ready, ?workspace= ({runtime}, {mode} mode)", _ms(named))
    table.add(f"snapshot, 100 kB per run ({runtime})", _ms(snap))
    table.add(f"restore ({runtime})", _ms(restore))


async def _measure(srv: Server, n: int, pool: list, named: list, snap: list, restore: list) -> str:
    for i in range(n):
        await srv.wait_ready(120)  # a full warm pool again
        seconds, ws = await _session(srv.url)
        pool.append(seconds)
        await ws.close()
        seconds, ws = await _session(f"{srv.url}?workspace=bench")
        named.append(seconds)
        await _call(ws, f"w{i}", type="write_file", path=f"f{i}.txt", content="x" * 100_000)
        t0 = time.perf_counter()
        await _call(ws, f"s{i}", type="snapshot", snapshot="b")
        snap.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await _call(ws, f"r{i}", type="restore", snapshot="b")
        restore.append(time.perf_counter() - t0)
        await ws.close()
    return json.loads(await asyncio.to_thread(_get, srv.http + "/v1/workspaces"))["mode"]


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workspaces")
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--runtime", default="runc")
    parser.add_argument("--image", default=None, help="sandbox image (default: the server's)")
    args = parser.parse_args()
    table = Table()
    asyncio.run(run(table, args.n, args.runtime, args.image))
    print()
    print(table.render())


if __name__ == "__main__":
    main()
