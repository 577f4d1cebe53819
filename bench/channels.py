"""The data channel (issue 15): the socket against the attach stream, under runc and runsc.

- ``engine_rows``: the engine's round trip and a sandbox's start (create, start, hello) on each channel;
- ``server_rows``: the WebSocket round trip (lean client) on each runtime and channel, and a session's
  start from an empty pool (connect to ready, a cold container);
- ``socket_echo``: the floor of the socket itself, a line echoed by a process in a hardened container
  through a Unix socket bind-mounted into it (against ``floors.attach_echo``);
- ``Processes``: CPU of every process a request touches (server, its sandboxes' containers from their
  shim down, dockerd, this client), for CPU per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time

from groundloop.sandbox import rundir
from groundloop.sandbox.docker_backend import DockerBackend

from .engine import settings
from .stats import Table, summary_ms

CHANNELS = {"socket": "auto", "attach": "attach"}  # GROUNDLOOP_SANDBOX_CHANNEL of each


def runtimes() -> list[str]:
    """runc, and runsc when Docker has it."""
    import docker

    with contextlib.closing(docker.from_env()) as client:
        return ["runc"] + (["runsc"] if "runsc" in client.info().get("Runtimes", {}) else [])


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"p50 {s['p50']:.{digits}f} ms, p99 {s['p99']:.{digits}f} ms"


async def engine_rows(table: Table, n: int, smoke: bool) -> None:
    starts_n = 3 if smoke else 20
    for runtime in runtimes():
        for setting in CHANNELS.values():
            backend = DockerBackend(settings(runtime=runtime, channel=setting))
            try:
                starts = []
                sb = None
                for _ in range(starts_n):
                    if sb is not None:
                        await sb.close()
                    t0 = time.perf_counter()
                    sb = await backend.start("bench-channel")
                    starts.append(time.perf_counter() - t0)
                assert sb is not None
                got = sb.channel  # "attach" where the socket cannot be had (an image of an older agent)
                await sb.request("run_code", {"code": "1 + 1"})
                rt = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    done = await sb.request("run_code", {"code": "1 + 1"})
                    rt.append(time.perf_counter() - t0)
                    assert done["ok"]
                await sb.close()
            finally:
                await backend.reap_all()
                await backend.close()
            main = runtime == "runc" and got == "socket"
            table.add(
                f"engine [{runtime}, {got}]: run_code 1 + 1 round trip",
                fmt(summary_ms(rt)),
                "p50 <= 0.4 ms" if main else "",
            )
            table.add(f"engine [{runtime}, {got}]: sandbox start (create+start+hello)", fmt(summary_ms(starts), 0))


async def server_rows(table: Table, n: int, smoke: bool) -> None:
    from .server import Client, Server, lean_rtt

    for runtime in runtimes():
        for setting in CHANNELS.values():
            env = {"GROUNDLOOP_SANDBOX_RUNTIME": runtime, "GROUNDLOOP_SANDBOX_CHANNEL": setting}
            async with Server(pool_size=1, **env) as srv:
                c, ready = await Client.open(srv.url)
                got = ready["sandbox"].get("channel", "attach")  # what the server could have, as above
                await c.close()
                lean = await asyncio.to_thread(lean_rtt, srv.url, {"type": "run_code", "code": "1 + 1"}, n)
            table.add(
                f"ws [{runtime}, {got}]: run_code 1 + 1 round trip (lean client)",
                fmt(summary_ms(lean)),
                "p50 <= 0.8 ms, p99 <= 2.5 ms" if got == "socket" else "",
            )
        # A session's start when no warm container waits: connect, a cold start, ready.
        async with Server(pool_size=0, GROUNDLOOP_SANDBOX_RUNTIME=runtime) as srv:
            starts = []
            for _ in range(3 if smoke else 30):
                t0 = time.perf_counter()
                c, ready = await Client.open(srv.url)
                starts.append(time.perf_counter() - t0)
                assert not ready["sandbox"]["warm"], ready
                await c.close()
                # Each start alone: the container of the session just closed is removed meanwhile
                # (dockerd and the shim, about 0.1 s of CPU), and that is not this start's cost.
                await asyncio.sleep(0.5)
        table.add(
            f"ws [{runtime}]: session start from an empty pool (connect to ready)",
            fmt(summary_ms(starts), 0),
            "p50, p99 <= 200 ms" if runtime == "runc" else "",
        )


ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect('/run/groundloop/echo.sock')\n"
    "while True:\n"
    "    d = s.recv(65536)\n"
    "    if not d: break\n"
    "    s.sendall(d)\n"
)


def socket_echo(table: Table, n: int) -> None:
    """A line through a Unix socket to a process in a hardened container and back: what the socket channel
    costs by itself (no agent), beside ``floor: echo through a container's attach stream (cat)``."""
    for runtime in runtimes():
        backend = DockerBackend(settings(runtime=runtime))
        rd = rundir.RunDir(backend.run_root, "bench", backend.instance)
        rd.create()
        listener = rd.listen("echo.sock")
        cid = None
        try:
            cid, attach = backend.create_and_attach("bench-floor", ["python3", "-c", ECHO], run_dir=rd)
            listener.setblocking(True)
            listener.settimeout(60)
            conn, _ = listener.accept()
            conn.settimeout(30)
            line = b"1 + 1\n"
            samples = []
            for i in range(n + 20):
                t0 = time.perf_counter()
                conn.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    data = conn.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the echo socket ended")
                    got += data
                if i >= 20:
                    samples.append(time.perf_counter() - t0)
                assert got == line, got
            conn.close()
            attach.close()
        finally:
            listener.close()
            if cid is not None:
                backend.remove(cid)
            rd.remove()
            backend.client.close()
        table.add(
            f"floor [{runtime}]: echo through a Unix socket bind-mounted into a container", fmt(summary_ms(samples))
        )


class Processes:
    """CPU seconds of the server, of every container of the namespace (its shim and all below it), of
    dockerd (shared with anything else on the machine) and of this process, between two ``take``s."""

    def __init__(self, server_pid: int, namespace: str = "bench"):
        self.server_pid = server_pid
        self.namespace = namespace

    @staticmethod
    def _stat(pid: int) -> tuple[int, float] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def take(self) -> dict[str, float]:
        import docker

        stats = {}
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = self._stat(int(name))
                if st is not None:
                    stats[int(name)] = st
                    children.setdefault(st[0], []).append(int(name))

        def tree(pid: int) -> float:
            total, todo = 0.0, [pid]
            while todo:
                p = todo.pop()
                if p in stats:
                    total += stats[p][1]
                todo.extend(children.get(p, []))
            return total

        with contextlib.closing(docker.from_env()) as client:
            pids = [
                client.api.inspect_container(c["Id"])["State"]["Pid"]
                for c in client.api.containers(filters={"label": [f"groundloop.namespace={self.namespace}"]})
            ]
        shims = {stats[p][0] for p in pids if p in stats}  # each container's parent: its shim
        dockerd = 0
        with contextlib.suppress(OSError, ValueError):
            with open("/run/docker.pid") as f:
                dockerd = int(f.read().strip())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "server": tree(self.server_pid),
            "containers": sum(tree(s) for s in shims),
            "dockerd": stats.get(dockerd, (0, 0.0))[1],
            "client": ru.ru_utime + ru.ru_stime,
        }


def cpu_row(before: dict[str, float], after: dict[str, float], requests: int) -> str:
    per = {k: (after[k] - before[k]) / max(1, requests) * 1e6 for k in after}
    total = sum(per.values())
    return f"{total / 1000:.2f} ms: " + ", ".join(f"{k} {v:.0f} us" for k, v in per.items())
