"""Stress benchmark: a bystander session's latency while hostile programs run next to it.

A real server (uvicorn on 127.0.0.1, real Docker) with the sandbox limits of the
hostile test suite. A bystander session of one user runs ``1 + 1`` back to back;
first alone (the baseline), then while another user's session runs each hostile
program (fork bomb, memory bomb, endless print, busy loop, ...). For each, the
table gets the bystander's p50/p99 round trip during the hostile run.

Runtimes: ``GROUNDLOOP_BENCH_RUNTIMES`` (comma-separated, default ``runc`` plus
``runsc`` when Docker has it registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time

from groundloop.sandbox.engine import Engine
from groundloop.sandbox.settings import SandboxSettings, load

from .server import Client
from .stats import Table, summary_ms

TOKENS = ["bench-hostile:mallory", "bench-bystander:bob"]
WAIT = 120.0

# (name, request type, payload, timeout_s)
PROGRAMS = [
    (
        "fork bomb (python, exec)",
        "exec",
        "python3 -c 'import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass'",
        3,
    ),
    ("fork bomb (shell)", "exec", "bomb() { bomb | bomb & }; bomb", 3),
    (
        "memory bomb",
        "run_code",
        "hog = []\nwhile True:\n    hog.append(bytearray(8 << 20))\n    hog[-1][::4096] = b'x' * len(hog[-1][::4096])",
        20,
    ),
    (
        "thread bomb",
        "run_code",
        "import threading, time\nwhile True:\n"
        "    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()",
        3,
    ),
    ("endless print", "run_code", "while True:\n    print('spam ' * 20)", 3),
    ("enormous line", "run_code", "import sys\nsys.stdout.write('x' * (64 << 20))\nsys.stdout.flush()", 20),
    ("busy loop", "run_code", "while True:\n    pass", 3),
    ("fill /tmp", "exec", "i=0; while dd if=/dev/zero of=/tmp/f$i bs=1M count=1 2>/dev/null; do i=$((i+1)); done", 20),
    (
        "ignores SIGINT/SIGTERM",
        "run_code",
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
        3,
    ),
]
SMOKE = {"fork bomb (shell)", "endless print", "busy loop"}


def _runtimes() -> list[str]:
    raw = os.environ.get("GROUNDLOOP_BENCH_RUNTIMES")
    if raw:
        return [r.strip() for r in raw.split(",") if r.strip()]
    out = ["runc"]
    try:
        import docker

        with contextlib.closing(docker.from_env()) as client:
            if "runsc" in (client.info().get("Runtimes") or {}):
                out.append("runsc")
    except Exception:
        pass
    return out


@contextlib.asynccontextmanager
async def serve(runtime: str):
    """A real server on a free loopback port, in this event loop."""
    from groundloop.server.app import create_app, serve_in_process
    from groundloop.server.settings import Settings

    sb = dataclasses.replace(
        load(SandboxSettings),
        namespace="bench",
        runtime=runtime,
        pool_size=2,
        memory="256m",
        pids_limit=128,
        tmp_size="32m",
        workspace_size="32m",
        max_file_bytes=4 << 20,
        max_output_bytes=1 << 20,
    )
    settings = Settings.from_env(
        environ={},
        host="127.0.0.1",
        port=0,
        tokens=list(TOKENS),
        sandbox=sb,
        resume_grace_s=1.0,
        rate_per_s=10000.0,
        rate_burst=10000,
    )
    app = create_app(settings)
    async with serve_in_process(app, settings, log_level="error") as server:
        engine = app.state.groundloop.engine
        await asyncio.wait_for(engine.wait_filled(), WAIT)
        yield Served(f"ws://127.0.0.1:{server.groundloop_port}/v1/ws", engine)


@dataclasses.dataclass
class Served:
    url: str
    engine: Engine

    async def settle(self, sessions: int) -> None:
        """Wait until ``sessions`` sandboxes are in use, none is starting or being removed and the pool
        is full, then for the new sandboxes' zygotes and spares. A hostile program's row measures that
        program: a pool refill or a closed session's removal beside it (under runsc about 1.5 s and 0.25 s
        of CPU, on 2 cores) is measured in a row of its own."""

        async def quiet() -> None:
            while True:
                counts = self.engine.counts()
                if (counts["in_use"], counts["starting"], counts["removing"]) == (
                    sessions,
                    0,
                    0,
                ) and self.engine.pool_full:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(quiet(), WAIT)  # a refill that keeps failing ends the bench, not hangs it
        await asyncio.sleep(1.0)


async def _end(client: Client) -> None:
    """End a session now (``close_session``), not after its resume grace."""
    with contextlib.suppress(Exception):
        await client.request({"type": "close_session"})
    await client.close()


class Bystander:
    def __init__(self, client: Client):
        self.c = client
        self.samples: list[float] = []
        self.failures = 0
        self.stop = False

    async def loop(self) -> None:
        while not self.stop:
            t0 = time.perf_counter()
            done = await self.c.request({"type": "run_code", "code": "1 + 1"})
            self.samples.append(time.perf_counter() - t0)
            if not done.get("ok"):
                self.failures += 1


async def _one_runtime(table: Table, n: int, smoke: bool, runtime: str) -> None:
    async with serve(runtime) as served:
        url = served.url
        by = Bystander((await Client.open(url, "bench-bystander", WAIT))[0])
        await by.c.request({"type": "run_code", "code": "1 + 1"})  # start the worker
        await served.settle(1)
        task = asyncio.create_task(by.loop())
        try:
            baseline = max(20, min(n, 1000))
            while len(by.samples) < baseline:
                await asyncio.sleep(0.05)
            s = summary_ms(by.samples)
            table.add(f"hostile[{runtime}]: bystander 1 + 1, alone", f"p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms")
            # Another user's session starting and ending: a pool refill (a container start) and a removal.
            mark, failures = len(by.samples), by.failures
            other, _ = await Client.open(url, "bench-hostile", WAIT)
            await other.request({"type": "run_code", "code": "1 + 1"})
            await _end(other)
            await served.settle(1)
            s = summary_ms(by.samples[mark:])
            table.add(
                f"hostile[{runtime}]: bystander during another session's start and end",
                f"p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms (n={len(by.samples) - mark})",
                f"p99 <= 100 ms; a pool refill and a removal; bystander failures {by.failures - failures}",
            )
            for name, kind, payload, timeout_s in PROGRAMS:
                if smoke and name not in SMOKE:
                    continue
                hostile, _ = await Client.open(url, "bench-hostile", WAIT)
                try:
                    await hostile.request({"type": "run_code", "code": "1 + 1"})
                    await served.settle(2)  # the refill this session's start set off
                    mark, failures = len(by.samples), by.failures
                    t0 = time.perf_counter()
                    field = "code" if kind == "run_code" else "command"
                    done = await hostile.request({"type": kind, field: payload, "timeout_s": timeout_s})
                    took = time.perf_counter() - t0
                    after = await hostile.request({"type": "run_code", "code": "1 + 1"})
                    during = by.samples[mark:]
                finally:
                    await _end(hostile)
                await served.settle(1)  # its removal
                s = summary_ms(during)
                outcome = "ok" if done.get("ok") else (done.get("error") or {}).get("name", "error")
                table.add(
                    f"hostile[{runtime}]: bystander during {name}",
                    f"p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms (n={len(during)})",
                    f"p99 <= 100 ms; hostile: {outcome} in {took:.1f} s, then "
                    f"{'usable' if after.get('ok') else 'NOT usable'}; "
                    f"bystander failures {by.failures - failures}",
                )
        finally:
            by.stop = True
            await asyncio.wait_for(task, WAIT)
            await by.c.close()


async def run(table: Table, n: int, smoke: bool = False) -> None:
    for runtime in _runtimes():
        await _one_runtime(table, n, smoke, runtime)
