"""Fresh contexts (issue 15, part 2): ``create_context`` plus its first ``run_code``, and what the
spares that make it fast cost in memory.

Timed over a real WebSocket session: ``create_context`` then ``run_code`` of ``1 + 1`` in it, until
its done; ``delete_context`` follows, untimed. Python contexts come one after the other (the zygote
forks the next spare in about a millisecond); JavaScript contexts are paced (``JS_PACE``), because a
spare node takes a whole node start to replace (140 ms here): back to back, the pool is empty and the
row measures a spawn, which the second JavaScript row shows.

The memory rows read ``/proc/<pid>/smaps_rollup`` of the sandbox's processes from the host (root
only; the spares are not dumpable, so not from inside the sandbox): PSS is what each process adds,
its shared pages split among those that map them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from .server import NAMESPACE, Client, Server, images
from .stats import Table, summary_ms

JS_PACE = 0.3  # seconds between paced JavaScript contexts: room for the spare to be replaced


async def fresh(client: Client, language: str, n: int, pace: float = 0.0) -> list[float]:
    out = []
    code = "1 + 1"
    for i in range(n):
        cid = f"fresh-{language}-{i}-{time.monotonic_ns()}"
        t0 = time.perf_counter()
        made = await client.request({"type": "create_context", "language": language, "context": cid})
        done = await client.request({"type": "run_code", "code": code, "context": cid, "language": language})
        out.append(time.perf_counter() - t0)
        assert made["ok"] and done["ok"], (made, done)
        await client.request({"type": "delete_context", "context": cid})
        if pace:
            await asyncio.sleep(pace)
    return out


async def fresh_runs(client: Client, language: str, n: int, pace: float = 0.0) -> list[float]:
    """``run_code`` with ``fresh: true``: the same clean context, in one request."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        done = await client.request({"type": "run_code", "code": "1 + 1", "language": language, "fresh": True})
        out.append(time.perf_counter() - t0)
        assert done["ok"], done
        if pace:
            await asyncio.sleep(pace)
    return out


def _kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def spare_memory() -> dict[str, list[tuple[int, int]]]:
    """(RSS, PSS) in KiB of the zygote, its spares and the spare node workers of the bench's sandboxes."""
    import docker

    found: dict[str, list[tuple[int, int]]] = {"zygote": [], "python spare": [], "node spare": []}
    with contextlib.closing(docker.from_env()) as client:
        for c in client.api.containers(filters={"label": [f"groundloop.namespace={NAMESPACE}"]}):
            pids = [int(row[1]) for row in client.api.top(c["Id"], ps_args="-eo user,pid")["Processes"]]
            cmd, ppid = {}, {}
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd[pid] = f.read().replace(b"\0", b" ").decode()
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        ppid[pid] = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
            for pid, line in cmd.items():
                if "groundloop_agent.zygote" in line:
                    role = "python spare" if "groundloop_agent.zygote" in cmd.get(ppid[pid], "") else "zygote"
                elif "jsworker.js" in line:
                    role = "node spare"  # the contexts were deleted: every node left is a spare
                else:
                    continue
                rss = _kib(f"/proc/{pid}/smaps_rollup", "Rss")
                pss = _kib(f"/proc/{pid}/smaps_rollup", "Pss")
                if rss is not None and pss is not None:
                    found[role].append((rss, pss))
    return found


def _row(table: Table, name: str, samples: list[float], goal: str = "") -> None:
    s = summary_ms(samples)
    table.add(name, f"p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms", goal)


async def run(table: Table, smoke: bool = False) -> None:
    for suffix, image in images():
        await run_image(table, smoke, suffix, image)


async def run_image(table: Table, smoke: bool, suffix: str, image: str) -> None:
    n = 10 if smoke else 300
    async with Server(pool_size=1, GROUNDLOOP_SANDBOX_IMAGE=image) as srv:
        client, _ = await Client.open(srv.url, timeout=120)
        try:
            await asyncio.sleep(0.5)  # the zygote starts with the agent
            await fresh(client, "python", 5)
            _row(
                table,
                "ws: fresh python context + first run (1 + 1)" + suffix,
                await fresh(client, "python", n),
                "p50 <= 3 ms",
            )
            await fresh_runs(client, "python", 5)
            _row(
                table,
                "ws: run_code fresh, python (1 + 1)" + suffix,
                await fresh_runs(client, "python", n),
                "p50 <= 3 ms",
            )
            await fresh(client, "javascript", 2, JS_PACE)
            m = 5 if smoke else 100
            _row(
                table,
                f"ws: fresh javascript context + first run (paced {JS_PACE:g} s)" + suffix,
                await fresh(client, "javascript", m, JS_PACE),
                "p50 <= 5 ms",
            )
            _row(
                table,
                f"ws: run_code fresh, javascript (paced {JS_PACE:g} s)" + suffix,
                await fresh_runs(client, "javascript", m, JS_PACE),
                "p50 <= 5 ms",
            )
            _row(
                table,
                "ws: fresh javascript context + first run (back to back)" + suffix,
                await fresh(client, "javascript", 5 if smoke else 30),
            )
            if suffix:
                return
            await asyncio.sleep(1.0)  # the spares are back
            if os.geteuid() != 0:
                table.add("memory per spare", "unavailable (reading the sandbox's /proc needs root)")
                return
            mem = await asyncio.to_thread(spare_memory)
            for role, rows in mem.items():
                if rows:
                    rss = sum(r for r, _ in rows) / len(rows) / 1024
                    pss = sum(p for _, p in rows) / len(rows) / 1024
                    table.add(f"memory: {role} (runc, mean of {len(rows)})", f"RSS {rss:.1f} MiB, PSS {pss:.1f} MiB")
        finally:
            await client.close()
