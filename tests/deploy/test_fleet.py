"""A fleet on one machine: three real ``groundloop serve`` processes behind deploy/haproxy.cfg.

Each server has its own GROUNDLOOP_SERVER_ID, namespace and loopback port;
HAProxy runs the shipped configuration with only its ``bind`` and ``server``
lines replaced. One test walks the fleet's life, in order:

1. new sessions spread over the three servers (leastconn);
2. every resume reaches the server that holds the session (its variables are there);
3. one server is SIGTERMed while a request of it streams: its clients get
   ``draining``, a resume through the proxy still reaches it, the running
   request finishes, the session closes 1012; a new session on it is refused
   (4503) and one through the proxy lands elsewhere;
   the sessions on the other two servers go on (a bystander's round trips are
   printed with their p99, not asserted); the server exits 0 and leaves no container;
4. one server is SIGKILLed: resumes of its sessions get ``not_found`` (4404)
   from a live server, with no hang, and its containers go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets
from support.env import IMAGE, NAMESPACE, REQUIRE_DOCKER
from support.system import free_port
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
WAIT = 120.0
TOKEN = "tok1"


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if path is None:
        if REQUIRE_DOCKER:
            pytest.fail("haproxy is missing (CI installs Debian's haproxy package)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return path


def haproxy_config(port: int, stats_port: int, servers: dict[str, int]) -> str:
    """deploy/haproxy.cfg with its front bind, its stats bind and its server lines replaced."""
    text = HAPROXY_CFG.read_text()
    text, n = re.subn(r"^(frontend groundloop\n(?:.*\n)*?    bind )\S+", rf"\g<1>127.0.0.1:{port}", text, flags=re.M)
    assert n == 1, "deploy/haproxy.cfg: no bind line in frontend groundloop"
    text, n = re.subn(r"^(frontend stats\n    bind )\S+", rf"\g<1>127.0.0.1:{stats_port}", text, flags=re.M)
    assert n == 1, "deploy/haproxy.cfg: no bind line in frontend stats"
    lines = "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in servers.items())
    text, n = re.subn(r"(?:^    server .*\n)+", lines, text, flags=re.M)
    assert n == 1, "deploy/haproxy.cfg: no block of server lines"
    return text


def containers(ns: str) -> list[dict]:
    import docker

    with contextlib.closing(docker.from_env(timeout=60)) as client:
        return client.api.containers(all=True, filters={"label": [f"groundloop.namespace={ns}"]})


def remove_namespace(ns: str) -> None:
    import docker

    with contextlib.closing(docker.from_env(timeout=60)) as client:
        for c in client.api.containers(all=True, filters={"label": [f"groundloop.namespace={ns}"]}):
            with contextlib.suppress(Exception):
                client.api.remove_container(c["Id"], force=True)


async def until_no_container(ns: str) -> None:
    """Wait for the namespace's containers to go (auto-remove is asynchronous): an event we cannot await."""
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        left = [c for c in await asyncio.to_thread(containers, ns) if c.get("State") in ("running", "created")]
        if not left:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"containers of {ns} left: {left}")


class Server:
    def __init__(self, server_id: str, log: Path, drain_s: float, host: str = "127.0.0.1", port: int | None = None):
        self.id = server_id
        self.ns = f"{NAMESPACE}-{server_id}"
        self.port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
        env.update(
            GROUNDLOOP_SERVER_ID=server_id,
            GROUNDLOOP_NAMESPACE=self.ns,
            GROUNDLOOP_TOKENS=f"{TOKEN}:alice",
            GROUNDLOOP_POOL_SIZE="1",
            # The bystanders send back to back (over 100 requests/s on a fast run): the user's token
            # bucket is not what this test is about.
            GROUNDLOOP_RATE_PER_S="100000",
            GROUNDLOOP_RATE_BURST="100000",
            GROUNDLOOP_DRAIN_S=str(drain_s),
            GROUNDLOOP_SANDBOX_IMAGE=IMAGE,
            GROUNDLOOP_LOG_LEVEL="info",
        )
        self.log_path = log
        self.log = open(log, "ab")
        groundloop = Path(sys.executable).with_name("groundloop")
        argv = [str(groundloop)] if groundloop.exists() else [sys.executable, "-m", "groundloop.server.cli"]
        self.proc = subprocess.Popen(
            [*argv, "serve", "--host", host, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = f"http://{host}:{self.port}"
        self.url = f"ws://{host}:{self.port}/v1/ws"

    async def ready(self) -> None:
        end = time.monotonic() + WAIT
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < end:
                assert self.proc.poll() is None, f"{self.id} exited: {self.tail()}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.http + "/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.id} did not become ready: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


class HAProxy:
    def __init__(self, servers: dict[str, int], tmp: Path, config: str | None = None, backend: str = "groundloop"):
        self.port, self.stats_port = free_port(), free_port()
        self.backend = backend
        cfg = tmp / "haproxy.cfg"
        if config is None:
            config = haproxy_config(self.port, self.stats_port, servers)
        cfg.write_text(config.replace("{port}", str(self.port)).replace("{stats_port}", str(self.stats_port)))
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = tmp / "haproxy.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    async def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, NOLB, DOWN...), from its stats CSV."""
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        rows = csv.DictReader(io.StringIO(r.text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == self.backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def until(self, name: str, state: str) -> None:
        end = time.monotonic() + WAIT
        seen = None
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                seen = (await self.states()).get(name)
                if seen is not None and seen.split()[0] == state:
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"HAProxy never saw {name} {state} (last: {seen})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def owner(session_id: str) -> str:
    return session_id.split(".", 1)[0]


async def refused(url: str, **params: str) -> tuple[dict, int]:
    """(first frame, close code) of a connection the server refuses after the upgrade."""
    if params:
        url += "?" + "&".join(f"{k}={v}" for k, v in params.items())
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, open_timeout=WAIT
    ) as ws:
        frame = __import__("orjson").loads(await asyncio.wait_for(ws.recv(), WAIT))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), WAIT)
    assert info.value.rcvd is not None
    return frame, info.value.rcvd.code


def p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


async def bystander(c: WSClient, stop: asyncio.Event, rtts: list[tuple[float, float]]) -> None:
    """Round trips on a session of a server that is not draining, until ``stop``: (start, seconds)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        done = await c.call("run_code", code="1 + 1")
        rtts.append((t0, time.perf_counter() - t0))
        assert done["ok"], done


def summary(samples: list[float]) -> str:
    if not samples:
        return "none"
    s = sorted(samples)
    return f"{len(s)} round trips, p50 {s[len(s) // 2] * 1000:.1f} ms, p99 {p99(s) * 1000:.1f} ms"


async def tear_down(clients, proxy, servers) -> None:
    """Close the clients, stop the proxy and the servers, and remove what each server left."""
    for c in clients:
        with contextlib.suppress(Exception):
            await c.ws.close()
    if proxy is not None:
        proxy.stop()
    for s in servers.values():
        s.stop()
        await asyncio.to_thread(remove_namespace, s.ns)


async def test_fleet_behind_haproxy(tmp_path):
    servers: dict[str, Server] = {}
    proxy = None
    clients: list[WSClient] = []
    watch: list[asyncio.Task] = []
    try:
        for i in (1, 2, 3):
            sid = f"gl-{i}"
            servers[sid] = Server(sid, tmp_path / f"{sid}.log", drain_s=60)
        await asyncio.gather(*(s.ready() for s in servers.values()))
        proxy = HAProxy({s.id: s.port for s in servers.values()}, tmp_path)
        for sid in servers:
            await proxy.until(sid, "UP")

        # 1. New sessions spread over the servers (each stays open: leastconn sees them).
        for i in range(6):
            c = await WSClient.connect(proxy.url, token=TOKEN)
            clients.append(c)
            assert (await c.call("run_code", code=f"mine = {i}"))["ok"]
        by_owner: dict[str, list[WSClient]] = {}
        for c in clients:
            by_owner.setdefault(owner(c.session_id), []).append(c)
        print("sessions per server:", {k: len(v) for k, v in sorted(by_owner.items())})
        assert set(by_owner) == set(servers), by_owner.keys()

        # 2. Every resume reaches its owner: the session's variable is there.
        for i, c in enumerate(list(clients)):
            await c.ws.close()
            again = await WSClient.connect(proxy.url, token=TOKEN, session=c.session_id, last_seq=c.last_seq)
            assert again.ready["resumed"] is True and again.session_id == c.session_id
            frames = await again.request("run_code", code="mine")
            assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == [str(i)], frames
            clients[i] = again
        by_owner = {}
        for c in clients:
            by_owner.setdefault(owner(c.session_id), []).append(c)

        # 3. SIGTERM gl-1 while one of its requests streams.
        victim = servers["gl-1"]
        streaming, *others = by_owner["gl-1"]
        by_gl2, by_gl3 = by_owner["gl-2"][0], by_owner["gl-3"][0]
        stop = asyncio.Event()
        rtts: list[tuple[float, float]] = []
        watch = [asyncio.create_task(bystander(c, stop, rtts)) for c in (by_gl2, by_gl3)]
        await asyncio.sleep(3)  # a baseline for the bystanders' round trips
        lines = 25
        code = f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n    time.sleep(0.2)\n'finished'"
        rid = await streaming.send("run_code", code=code)
        while not streaming.of(rid, "stdout"):
            await streaming.recv()
        victim.proc.send_signal(signal.SIGTERM)
        t_term = time.perf_counter()
        draining = None
        while draining is None:
            f = await streaming.recv()
            if f["type"] == "draining":
                draining = f
        assert 0 < draining["deadline_s"] <= 60 and draining["message"], draining
        # The client drops and resumes through the proxy: a draining server still gets its resumes.
        before = streaming.of(rid)
        await streaming.ws.close()
        streaming = await WSClient.connect(
            proxy.url, token=TOKEN, session=streaming.session_id, last_seq=streaming.last_seq
        )
        assert streaming.ready["resumed"] is True and owner(streaming.session_id) == "gl-1"
        # While it drains: not ready (404 = HAProxy's NOLB), a new session on it is refused with
        # 4503, a new request on a draining session is refused with its done, and a new session
        # through the proxy lands on another server.
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(victim.http + "/readyz")
        assert r.status_code == 404 and r.json()["draining"] is True, r.text
        frame, close = await refused(victim.url)
        assert frame["type"] == "error" and frame["code"] == "draining" and close == 4503, (frame, close)
        late = await streaming.send("run_code", code="2")
        await proxy.until("gl-1", "NOLB")
        fresh = await WSClient.connect(proxy.url, token=TOKEN)
        assert owner(fresh.session_id) != "gl-1", fresh.session_id
        assert (await fresh.call("run_code", code="3"))["ok"]
        await fresh.ws.close()
        # The running request finishes, with all its output, then the session closes 1012.
        frames = before + await streaming.until_done(rid)
        assert frames[-1]["ok"] is True, frames[-1]
        assert WSClient.text(frames) == "".join(f"{i}\n" for i in range(lines))
        late_done = (await streaming.until_done(late))[-1]
        assert late_done["ok"] is False and late_done["error"]["name"] == "Draining", late_done
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await streaming.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1012, info.value
        for c in others:  # an idle session of the drained server: draining, then 1012
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await c.recv()
            assert any(f["type"] == "draining" for f in c.frames)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert await asyncio.to_thread(victim.proc.wait, WAIT) == 0, victim.tail()
        await until_no_container(victim.ns)
        stop.set()
        await asyncio.gather(*watch)
        print("bystanders before the SIGTERM:", summary([d for t, d in rtts if t < t_term]))
        print("bystanders during the drain:", summary([d for t, d in rtts if t >= t_term]))
        assert any(t >= t_term for t, _ in rtts), "the bystanders made no round trip during the drain"
        # A resume of a drained session: the owner is gone, another server says not_found.
        frame, close = await refused(proxy.url, session=streaming.session_id, last_seq=str(streaming.last_seq))
        assert frame["code"] == "not_found" and close == 4404, (frame, close)

        # 4. SIGKILL gl-2: its sessions' resumes fail fast with not_found, and its containers go.
        dead = servers["gl-2"]
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(WAIT)
        for c in by_owner["gl-2"]:
            t0 = time.perf_counter()
            frame, close = await asyncio.wait_for(
                refused(proxy.url, session=c.session_id, last_seq=str(c.last_seq)), 30
            )
            print(f"resume of a killed server's session: not_found in {(time.perf_counter() - t0) * 1000:.0f} ms")
            assert frame["code"] == "not_found" and close == 4404, (frame, close)
        await until_no_container(dead.ns)
        # gl-3 never noticed.
        assert (await by_gl3.call("run_code", code="mine"))["ok"]
    finally:
        for t in watch:
            t.cancel()
        await asyncio.gather(*watch, return_exceptions=True)
        await tear_down(clients, proxy, servers)


# ---- the Kubernetes router: deploy/k8s/router/haproxy.cfg, its DNS answered on loopback

K8S_ROUTER_CFG = ROOT / "deploy" / "k8s" / "router" / "haproxy.cfg"
PODS = "groundloop-pods.groundloop.svc.cluster.local."


class ClusterDNS:
    """A DNS server on loopback standing in for the cluster's CoreDNS: A records of the headless Service
    (every pod) and of each endpoint's own name (its dashed IP); anything else NXDOMAIN."""

    def __init__(self):
        from dnslib.server import DNSServer

        self.pods: dict[str, str] = {}  # pod name -> address
        self.server = DNSServer(self, port=0, address="127.0.0.1")
        self.server.start_thread()
        self.port = self.server.server.server_address[1]

    def resolve(self, request, handler):
        from dnslib import QTYPE, RCODE, RR, A

        reply = request.reply()
        name = str(request.q.qname).lower()
        pod = name[: -len(PODS) - 1] if name.endswith("." + PODS) else None
        if name == PODS:
            addresses = list(self.pods.values())
        elif pod in self.pods:
            addresses = [self.pods[pod]]
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply

    def stop(self) -> None:
        self.server.stop()
        self.server.server.server_close()


def k8s_router_config(dns_port: int, server_port: int) -> str:
    """The Kubernetes router's file, with loopback binds, this DNS server and the servers' port."""
    text = K8S_ROUTER_CFG.read_text()
    for old, new in (
        ("    parse-resolv-conf\n", f"    nameserver test 127.0.0.1:{dns_port}\n"),
        ("    bind :8080\n", "    bind 127.0.0.1:{port}\n"),
        ("    bind :8404\n", "    bind 127.0.0.1:{stats_port}\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    text, n = re.subn(r":8000\b", f":{server_port}", text)
    assert n == 2, "the router's file names port 8000 twice (the template and the owner)"
    return text


async def test_kubernetes_router_routes_by_pod_name(tmp_path):
    """Two servers named as the DaemonSet names its pods (the dashed pod IP), on two loopback addresses
    and one port (as pods are); the router finds them by the headless Service's name and sends each resume
    to its pod by the name CoreDNS gives that endpoint."""
    haproxy_binary()
    dns = ClusterDNS()
    servers: dict[str, Server] = {}
    proxy = None
    clients: list[WSClient] = []
    try:
        port = free_port()
        for address in ("127.0.0.21", "127.0.0.22"):
            name = address.replace(".", "-")  # what the DaemonSet's command makes of status.podIP
            servers[name] = Server(name, tmp_path / f"{name}.log", drain_s=5, host=address, port=port)
            dns.pods[name] = address
        await asyncio.gather(*(s.ready() for s in servers.values()))
        proxy = HAProxy({}, tmp_path, config=k8s_router_config(dns.port, port), backend="servers")
        end = time.monotonic() + WAIT
        up = 0
        while up < 2:  # the router finds both pods through the Service's name
            assert time.monotonic() < end and proxy.proc.poll() is None, proxy.log_path.read_text()[-3000:]
            await asyncio.sleep(0.2)
            with contextlib.suppress(httpx.HTTPError):
                up = sum(st.startswith("UP") for st in (await proxy.states()).values())
        for i in range(4):
            c = await WSClient.connect(proxy.url, token=TOKEN)
            clients.append(c)
            assert (await c.call("run_code", code=f"mine = {i}"))["ok"]
        owners = {owner(c.session_id) for c in clients}
        assert owners == set(servers), owners
        for i, c in enumerate(list(clients)):
            await c.ws.close()
            again = await WSClient.connect(proxy.url, token=TOKEN, session=c.session_id, last_seq=c.last_seq)
            frames = await again.request("run_code", code="mine")
            assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == [str(i)], frames
            clients[i] = again
        # A pod killed while its DNS record is still there: the connection to it is refused, the
        # request is redispatched, and a live server answers not_found.
        dead_name = owner(clients[0].session_id)
        dead = servers[dead_name]
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(WAIT)
        mine = [c for c in clients if owner(c.session_id) == dead_name]
        for c in mine:
            frame, close = await asyncio.wait_for(
                refused(proxy.url, session=c.session_id, last_seq=str(c.last_seq)), 30
            )
            assert frame["code"] == "not_found" and close == 4404, (frame, close)
        # And once the record is gone (the pod deleted): not_found as well.
        del dns.pods[dead_name]
        await asyncio.sleep(2.5)  # past the router's DNS cache (`hold valid 2s`): no event to await
        c = mine[0]
        t0 = time.perf_counter()
        frame, close = await asyncio.wait_for(refused(proxy.url, session=c.session_id, last_seq=str(c.last_seq)), 30)
        print(f"resume of a deleted pod's session: not_found in {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert frame["code"] == "not_found" and close == 4404, (frame, close)
        await until_no_container(dead.ns)
    finally:
        await tear_down(clients, proxy, servers)
        dns.stop()
