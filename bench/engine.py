"""Engine-level benchmarks: the agent protocol over the container's attach stream."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time

from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.engine import Engine
from groundloop.sandbox.settings import SandboxSettings, load

from .stats import Table, summary_ms


def settings(**overrides) -> SandboxSettings:
    return dataclasses.replace(load(SandboxSettings), namespace="bench", **overrides)


async def run(table: Table, n: int) -> None:
    s = settings(pool_size=2)
    engine = Engine(DockerBackend(s), s)
    await engine.start()
    try:
        await asyncio.wait_for(engine.wait_filled(), 120)
        # pool acquire vs a cold start
        acquire = []
        sandboxes = []
        for _ in range(2):
            t0 = time.perf_counter()
            sandboxes.append(await engine.acquire())
            acquire.append(time.perf_counter() - t0)
        cold = []
        for _ in range(max(2, n // 200)):
            t0 = time.perf_counter()
            sb = await engine.backend.start("bench-cold")  # what a cold acquire does
            cold.append(time.perf_counter() - t0)
            await sb.close()
        sb = sandboxes[0]
        await sb.request("run_code", {"code": "1 + 1"})  # start the worker
        rt = []
        for _ in range(n):
            t0 = time.perf_counter()
            done = await sb.request("run_code", {"code": "1 + 1"})
            rt.append(time.perf_counter() - t0)
            assert done["ok"]
        ping = []
        for _ in range(n):
            t0 = time.perf_counter()
            await sb.request("ping")
            ping.append(time.perf_counter() - t0)
        # docker exec of the same, in the same container
        ex = []
        for _ in range(max(5, n // 50)):
            t0 = time.perf_counter()
            subprocess.run(
                ["docker", "exec", sb.id, "python3", "-c", "print(1 + 1)"], check=True, stdout=subprocess.DEVNULL
            )
            ex.append(time.perf_counter() - t0)
        ex_sh = []
        for _ in range(max(5, n // 50)):
            t0 = time.perf_counter()
            subprocess.run(["docker", "exec", sb.id, "true"], check=True)
            ex_sh.append(time.perf_counter() - t0)
        # time to first streamed line
        first = []
        for _ in range(max(10, n // 20)):
            got = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()

            async def on_event(ev, got=got, t0=t0):
                if ev["ev"] == "out" and not got.done():
                    got.set_result(time.perf_counter() - t0)

            await sb.request("run_code", {"code": "print('hello')\nimport time\ntime.sleep(0.01)"}, on_event)
            first.append(await got)
        r, p, e, f = summary_ms(rt), summary_ms(ping), summary_ms(ex), summary_ms(first)
        table.add("engine: run_code 1 + 1 round trip", f"p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms", "p50 <= 1 ms")
        table.add("engine: ping round trip (agent only)", f"p50 {p['p50']:.3f} ms, p99 {p['p99']:.3f} ms")
        table.add(
            "docker exec python3 -c 'print(1 + 1)'",
            f"p50 {e['p50']:.1f} ms, p99 {e['p99']:.1f} ms",
            f">= 20x slower: {e['p50'] / r['p50']:.0f}x",
        )
        table.add("docker exec true", f"p50 {summary_ms(ex_sh)['p50']:.1f} ms")
        table.add("engine: pool acquire", f"p50 {summary_ms(acquire)['p50']:.3f} ms", "<= 20 ms")
        table.add("engine: cold container start (create+attach+start+hello)", f"p50 {summary_ms(cold)['p50']:.0f} ms")
        table.add("engine: time to first streamed line", f"p50 {f['p50']:.3f} ms, p99 {f['p99']:.3f} ms")
        for sb in sandboxes:
            await engine.release(sb)
    finally:
        await engine.close()
