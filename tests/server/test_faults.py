"""Faults: the server and its sessions survive what happens around them.

- the container killed from outside in the middle of a run (runc and runsc);
- the agent process killed from inside;
- the Docker engine's API briefly unreachable (a unix-socket proxy in front of the
  real engine is switched off and on; the real dockerd is never disturbed);
- the server killed with SIGKILL and started again: orphans removed at start-up;
- a client that disconnects during a flood (resume and cancel, then the grace expires);
- malformed, oversized and random frames (hypothesis) never crash a connection or the server;
- a burst of 100 connections from one user against the per-user session limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import orjson
import pytest
import pytest_asyncio
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from support.env import IMAGE, NAMESPACE, sandbox_settings, server_settings
from support.servers import run_server
from support.system import free_port, rss
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

WAIT = 120.0
RSS_BOUND = 200 << 20
ROOT = Path(__file__).resolve().parents[2]


def docker_client():
    import docker

    return docker.from_env(timeout=60)


def kill_container(cid: str) -> None:
    with contextlib.closing(docker_client()) as client:
        client.api.kill(cid)


def running(cid: str) -> bool:
    import docker

    with contextlib.closing(docker_client()) as client:
        try:
            return bool(client.api.inspect_container(cid)["State"]["Running"])
        except docker.errors.NotFound:
            return False


async def usable(c: WSClient) -> None:
    frames = await asyncio.wait_for(c.request("run_code", code="1 + 1", timeout_s=30), WAIT)
    assert frames[-1]["ok"], frames[-1]
    assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == ["2"]


async def until_replaced(c: WSClient) -> dict:
    while True:
        for f in c.frames:
            if f["type"] == "sandbox_replaced":
                return f
        await c.recv(WAIT)


RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]


# ---- the sandbox dies under a request ---------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, memory="256m", pids_limit=128)
    async with run_server(server_settings(sandbox=sb, resume_grace_s=2.0)) as s:
        yield s


async def test_container_killed_mid_run(srv):
    async with await WSClient.connect(srv.url, token="tok1") as c:
        session = srv.state.manager.sessions[c.session_id]
        old = session.sb.id
        rid = await c.send("run_code", code="import time\nprint('running', flush=True)\ntime.sleep(60)")
        while not c.of(rid, "stdout"):
            await c.recv(WAIT)
        await asyncio.to_thread(kill_container, old)
        done = (await c.until_done(rid, WAIT))[-1]
        assert done["ok"] is False and done["error"]["name"] == "SandboxLost", done
        replaced = await until_replaced(c)
        assert replaced["state_lost"] is True and replaced["session_id"] == c.session_id
        await usable(c)
        assert session.sb.id != old and not await asyncio.to_thread(running, old)


async def test_agent_killed(srv):
    async with await WSClient.connect(srv.url, token="tok1") as c:
        await usable(c)
        old = srv.state.manager.sessions[c.session_id].sb.id
        # the shell's parent is the agent: kill it from inside, mid-request
        frames = await c.request("exec", command="echo bye; kill -KILL $PPID; sleep 30", timeout_s=60)
        done = frames[-1]
        assert done["ok"] is False and done["error"]["name"] == "SandboxLost", done
        await until_replaced(c)
        await usable(c)
        assert not await asyncio.to_thread(running, old)


# ---- the Docker engine briefly unreachable ----------------------------------------------------


class DockerProxy:
    """A unix socket forwarding to the real Docker socket, that can be switched off.

    Off: every new connection is dropped at once, and so is every open API connection;
    hijacked attach streams (running sandboxes) are kept, as they would be by an engine
    whose API is briefly down. A connection is an attach stream once a request on it
    (keep-alive connections carry several) asks for ``/attach``. (The socket file is
    not unlinked: docker-py leaks the socket of a failed unix connect, a ResourceWarning
    that would surface in a later test.)
    """

    class Conn:
        def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter):
            self.writers = (client, upstream)
            self.attach = False

    def __init__(self, path: str, upstream: str = "/var/run/docker.sock"):
        self.path = path
        self.upstream = upstream
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[DockerProxy.Conn] = set()
        self.tasks: set[asyncio.Task] = set()
        self.available = True

    async def up(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_unix_server(self._handle, self.path)
        self.available = True

    async def down(self) -> None:
        self.available = False
        for conn in list(self.conns):
            if not conn.attach:
                self._drop(conn)

    def _drop(self, conn: DockerProxy.Conn) -> None:
        self.conns.discard(conn)
        for w in conn.writers:
            w.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            self._drop(conn)
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader, writer) -> None:
        if not self.available:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        except OSError:
            writer.transport.abort()
            return
        conn = self.Conn(writer, up_w)
        if not self.available:
            self._drop(conn)
            return
        self.conns.add(conn)
        for src, dst, sniff in ((reader, up_w, True), (up_r, writer, False)):
            t = asyncio.create_task(self._pump(src, dst, conn, sniff))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, src, dst, conn, sniff: bool) -> None:
        try:
            while data := await src.read(1 << 16):
                if sniff and not conn.attach and b"/attach?" in data and b" HTTP/1." in data:
                    conn.attach = True
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if conn in self.conns:
                self._drop(conn)


async def first_frame(url: str, token: str) -> tuple[dict, websockets.ClientConnection]:
    ws = await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None, max_size=None, open_timeout=WAIT
    )
    return orjson.loads(await asyncio.wait_for(ws.recv(), WAIT)), ws


async def test_docker_api_unreachable():
    import docker
    from groundloop.sandbox.docker_backend import DockerBackend
    from groundloop.sandbox.engine import Engine
    from groundloop.server.metrics import Metrics

    with tempfile.TemporaryDirectory() as tmp:
        proxy = DockerProxy(os.path.join(tmp, "docker.sock"))
        await proxy.up()
        # (the constructor asks the engine for its version: not from the loop that runs the proxy)
        client = await asyncio.to_thread(docker.DockerClient, base_url=f"unix://{proxy.path}", timeout=30)
        sb = sandbox_settings(pool_size=1)
        metrics = Metrics()
        engine = Engine(DockerBackend(sb, client=client), sb, hooks=metrics)
        try:
            async with (
                run_server(server_settings(sandbox=sb, resume_grace_s=1.0), engine=engine, metrics=metrics) as s,
                httpx.AsyncClient(base_url=s.http, timeout=WAIT) as http,
            ):
                await asyncio.wait_for(engine.wait_filled(), WAIT)
                assert (await http.get("/readyz")).status_code == 200
                await proxy.down()
                # not ready, and says why; liveness is unaffected
                r = await http.get("/readyz")
                assert r.status_code == 503 and r.json()["ready"] is False, r.text
                assert (await http.get("/healthz")).status_code == 200
                # the warm sandbox is already attached: a session still gets it and runs code
                async with await WSClient.connect(s.url, token="tok1") as a:
                    await usable(a)
                    # no sandbox can be started now: a clear sandbox_unavailable, then close 1013
                    frame, ws = await first_frame(s.url, "tok2")
                    assert frame["type"] == "error" and frame["code"] == "sandbox_unavailable", frame
                    assert frame["seq"] == 0
                    with pytest.raises(websockets.ConnectionClosed) as info:
                        await asyncio.wait_for(ws.recv(), WAIT)
                    assert info.value.rcvd.code == 1013
                    await usable(a)  # the running session did not notice
                await proxy.up()
                async with await WSClient.connect(s.url, token="tok2") as b:
                    await usable(b)
                refill = engine._refill_task
                assert refill is not None and not refill.done(), refill
                try:
                    await asyncio.wait_for(engine.wait_filled(), WAIT)
                except TimeoutError:
                    raise AssertionError(f"the pool did not refill: {engine.status()}") from None
                assert (await http.get("/readyz")).status_code == 200
        finally:
            await proxy.close()


# ---- the server killed with SIGKILL and started again -----------------------------------------


def namespace_containers(ns: str) -> list[dict]:
    with contextlib.closing(docker_client()) as client:
        return client.api.containers(all=True, filters={"label": [f"groundloop.namespace={ns}"]})


def remove_namespace(ns: str) -> None:
    with contextlib.closing(docker_client()) as client:
        for c in client.api.containers(all=True, filters={"label": [f"groundloop.namespace={ns}"]}):
            with contextlib.suppress(Exception):
                client.api.remove_container(c["Id"], force=True)


class ServerProcess:
    def __init__(self, ns: str, log: Path, run_dir: Path | None = None):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
        env.update(
            {
                "GROUNDLOOP_NAMESPACE": ns,
                "GROUNDLOOP_TOKENS": "tok1:alice",
                "GROUNDLOOP_POOL_SIZE": "1",
                "GROUNDLOOP_HOST": "127.0.0.1",
                "GROUNDLOOP_PORT": str(self.port),
                "GROUNDLOOP_SANDBOX_IMAGE": IMAGE,
                "GROUNDLOOP_LOG_LEVEL": "warning",
            }
        )
        if run_dir is not None:  # sandboxes with the socket channel, whose directories live there
            env["GROUNDLOOP_RUN_DIR"] = str(run_dir)
            env["GROUNDLOOP_SANDBOX_CHANNEL"] = "auto"
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "groundloop.server.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    async def ready(self) -> None:
        """Poll /readyz: the server is another process, there is no event to await."""
        loop = asyncio.get_running_loop()
        end = loop.time() + WAIT
        async with httpx.AsyncClient(timeout=5) as http:
            while loop.time() < end:
                assert self.proc.poll() is None, f"the server exited: {self.proc.returncode}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.http + "/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise AssertionError("the server did not become ready")

    def stop(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


async def test_server_sigkill_and_restart(tmp_path):
    ns = f"{NAMESPACE}-restart"
    first = second = None
    run_dir = tmp_path / "run"  # the sandboxes' host directories (sandbox/rundir.py)
    try:
        first = ServerProcess(ns, tmp_path / "server.log", run_dir)
        await first.ready()
        async with await WSClient.connect(first.url, token="tok1") as c:
            await usable(c)
            before = {x["Id"] for x in await asyncio.to_thread(namespace_containers, ns)}
            assert len(before) >= 2  # the session's sandbox and the warm pool
            dirs_before = {d for d in os.listdir(run_dir) if not d.startswith(".")}  # not .instances
            assert len(dirs_before) >= 2
            await asyncio.to_thread(first.stop, signal.SIGKILL)
        # an orphan that would outlive its server (an agent that never sees EOF)
        orphan = await asyncio.to_thread(_plant_orphan, ns)
        second = ServerProcess(ns, tmp_path / "server.log", run_dir)
        await second.ready()  # orphans are reaped before the server says ready
        for cid in before | {orphan}:
            assert not await asyncio.to_thread(running, cid), cid
        assert not dirs_before & set(os.listdir(run_dir))  # and their directories
        async with await WSClient.connect(second.url, token="tok1") as c:
            await usable(c)
        # graceful shutdown; uvicorn re-raises the captured SIGTERM after it, hence -15
        assert await asyncio.to_thread(second.stop, signal.SIGTERM) in (0, -signal.SIGTERM)
        left = [x for x in await asyncio.to_thread(namespace_containers, ns) if x["State"] == "running"]
        assert left == [], left
        # nothing left but the (empty) directory of instance locks: the killed server's went with its reaping
        assert os.listdir(run_dir) == [".instances"] and os.listdir(run_dir / ".instances") == []
    finally:
        for p in (first, second):
            if p is not None and p.proc.poll() is None:
                await asyncio.to_thread(p.stop, signal.SIGKILL)
        await asyncio.to_thread(remove_namespace, ns)


def _plant_orphan(ns: str) -> str:
    with contextlib.closing(docker_client()) as client:
        api = client.api
        created = api.create_container(
            IMAGE,
            command=["sleep", "600"],
            user="1000:1000",
            network_disabled=True,
            labels={
                "groundloop.managed": "true",
                "groundloop.namespace": ns,
                "groundloop.instance": "dead0000",
                "groundloop.session": "orphan",
            },
            host_config=api.create_host_config(network_mode="none", cap_drop=["ALL"], read_only=True),
        )
        api.start(created["Id"])
        return created["Id"]


# ---- a client that disconnects during a flood -------------------------------------------------


async def test_disconnect_during_flood():
    rss0 = rss()
    sb = sandbox_settings(pool_size=1, max_output_bytes=64 << 20)
    async with run_server(server_settings(sandbox=sb, resume_grace_s=3.0, send_queue_frames=256)) as s:
        c = await WSClient.connect(s.url, token="tok1")
        sid = c.session_id
        session = s.state.manager.sessions[sid]
        container = session.sb.id
        rid = await c.send("run_code", code="while True:\n    print('flood ' * 30)", timeout_s=120)
        while len(c.of(rid, "stdout")) < 100:
            await c.recv(WAIT)
        c.ws.transport.abort()  # gone without a close frame
        await asyncio.wait_for(session.detached.wait(), WAIT)
        assert rid in session.inflight and session.outbox.unsent <= 256 + 64
        # resume, read on, cancel the flood
        r = await WSClient.connect(s.url, token="tok1", session=sid, last_seq=c.last_seq)
        for _ in range(50):
            await r.recv(WAIT)
        await r.send("cancel", target=rid)
        done = (await r.until_done(rid, WAIT))[-1]
        assert done["ok"] is False and done["error"]["name"] == "Cancelled", done
        await usable(r)
        # gone again, for good: the grace expires, the session and its container go
        r.ws.transport.abort()
        await asyncio.wait_for(session.closed.wait(), WAIT)
        assert sid not in s.state.manager.sessions
        assert not await asyncio.to_thread(running, container)
        async with httpx.AsyncClient(base_url=s.http) as http:
            assert (await http.get("/healthz")).status_code == 200
    assert rss() - rss0 < RSS_BOUND


# ---- malformed, oversized and random frames ---------------------------------------------------

MAX_MESSAGE = 8 << 10
KNOWN_TYPES = {
    "ready",
    "stdout",
    "stderr",
    "result",
    "done",
    "error",
    "pong",
    "exit",
    "token",
    "code",
    "attempt",
    "gap",
    "sandbox_replaced",
}
REQUEST_TYPES = [
    "run_code",
    "exec",
    "create_context",
    "delete_context",
    "list_contexts",
    "write_file",
    "read_file",
    "list_files",
    "delete_file",
    "mkdir",
    "start_process",
    "kill_process",
    "list_processes",
    "cancel",
    "assist",
    "ping",
    "",
    "PING",
    "done",
    "ready",
]


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    _containers,
    max_leaves=12,
)
ids = st.one_of(
    st.text(max_size=300),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.booleans(),
)
FIELDS = [
    "code",
    "command",
    "path",
    "timeout_s",
    "target",
    "context",
    "language",
    "content",
    "encoding",
    "env",
    "cwd",
    "process_id",
    "prompt",
    "max_iterations",
    "recursive",
    "signal",
]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
requests = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(REQUEST_TYPES), st.text(max_size=12), scalars, json_values)},
    optional={"id": ids, **{f: json_values for f in FIELDS}},
)


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


frames_strategy = st.one_of(
    requests.map(_dump),
    requests.map(lambda d: _dump(d).encode()),  # binary frames of JSON
    json_values.map(_dump),  # JSON that is no request
    st.text(max_size=200),  # not JSON
    st.binary(max_size=200),  # not UTF-8
    st.binary(min_size=MAX_MESSAGE + 1, max_size=3 * MAX_MESSAGE),  # over max_message_bytes
    st.integers(MAX_MESSAGE + 1, 3 * MAX_MESSAGE).map(
        lambda n: '{"type":"run_code","id":"big","code":"' + "#" * n + '"}'
    ),
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz():
    sb = sandbox_settings(pool_size=1, exec_timeout_s=3.0, max_exec_timeout_s=3.0)
    settings = server_settings(
        sandbox=sb, max_message_bytes=MAX_MESSAGE, rate_per_s=10000.0, rate_burst=10000, max_inflight=1000
    )
    async with run_server(settings) as s:
        async with await WSClient.connect(s.url, token="tok1") as c:
            yield s, c


_sentinels = iter(range(10**9))


@hsettings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(frame=frames_strategy)
async def test_random_frames(fuzz, frame):
    s, c = fuzz
    mark = len(c.frames)
    await c.send_raw(frame)
    sentinel = f"sentinel-{next(_sentinels)}"
    frames = await c.request("ping", id=sentinel)
    assert [f["type"] for f in frames] == ["pong", "done"] and frames[-1]["ok"], frames
    for f in c.frames[mark:]:
        assert f.get("type") in KNOWN_TYPES and isinstance(f.get("seq"), int), f
        assert not (f["type"] == "error" and f["code"] == "internal"), f
        assert not (f["type"] == "done" and (f.get("error") or {}).get("name") == "InternalError"), f


async def test_unhashable_type(fuzz):
    s, _ = fuzz
    async with await WSClient.connect(s.url, token="tok2") as c:
        for bad in ([], {}, [["run_code"]]):
            await c.send_raw(orjson.dumps({"type": bad, "id": "u1"}).decode())
            frames = await c.until_done("u1", WAIT)
            assert frames[0]["type"] == "error" and frames[0]["code"] == "bad_request", frames
            assert frames[-1]["error"]["name"] == "BadRequest"
        await usable(c)


async def test_after_random_frames(fuzz):
    s, c = fuzz
    await usable(c)
    async with httpx.AsyncClient(base_url=s.http) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert "groundloop" in (await http.get("/metrics")).text
    # past the transport's limit: this connection is closed 1009, the server goes on
    async with await WSClient.connect(s.url, token="tok2") as other:
        await other.send_raw("x" * (2 * MAX_MESSAGE + (64 << 10) + 1))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await other.recv(WAIT)
        assert info.value.rcvd.code == 1009
    await usable(c)


# ---- a burst of connections from one user -----------------------------------------------------


async def test_connection_burst():
    rss0 = rss()
    limit = 4
    sb = sandbox_settings(pool_size=1)
    async with run_server(server_settings(sandbox=sb, max_sessions_per_user=limit, resume_grace_s=1.0)) as s:

        async def one():
            try:
                frame, ws = await first_frame(s.url, "tok1")
            except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
                return ("refused", repr(exc), None)
            if frame["type"] == "ready":
                return ("ready", frame, ws)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
            return (frame.get("code"), info.value.rcvd.code if info.value.rcvd else None, ws)

        outcomes = await asyncio.gather(*(one() for _ in range(100)))
        ready = [o for o in outcomes if o[0] == "ready"]
        busy = [o for o in outcomes if o[0] == "busy"]
        assert 1 <= len(ready) <= limit, [o[:2] for o in outcomes if o[0] != "busy"]
        assert len(ready) + len(busy) == 100, [o[:2] for o in outcomes if o[0] not in ("ready", "busy")]
        assert all(o[1] == 4429 for o in busy)
        # the accepted sessions work
        sids = []
        for _, frame, ws in ready:
            sids.append(frame["session_id"])
            await ws.send(orjson.dumps({"type": "run_code", "id": "x", "code": "1 + 1"}).decode())
            while True:
                f = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
                if f["type"] == "done":
                    assert f["ok"], f
                    break
        sessions = [s.state.manager.sessions[sid] for sid in sids]
        containers = [x.sb.id for x in sessions]
        for _, _, ws in outcomes:
            if ws is not None:
                await ws.close()
        for x in sessions:
            await asyncio.wait_for(x.closed.wait(), WAIT)
        assert not s.state.manager.sessions
        for cid in containers:
            assert not await asyncio.to_thread(running, cid)
        async with httpx.AsyncClient(base_url=s.http) as http:
            assert (await http.get("/healthz")).status_code == 200
        async with await WSClient.connect(s.url, token="tok1") as c:
            await usable(c)
    assert rss() - rss0 < RSS_BOUND
