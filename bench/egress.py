"""Egress (issue 17): what the proxy adds. A request and a 50 MB download from a local index on
127.0.0.2, from inside a sandbox through its proxy and the server's gate, against the same client
code run directly on the host. Nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.egress import EgressOwner
from groundloop.sandbox.engine import Engine
from groundloop.sandbox.settings import SandboxSettings, load

from .stats import Table, summary_ms

HOST = "127.0.0.2"
CHUNK = 1 << 20

# The client, the same on both sides: n small requests (one connection each, as pip's first page),
# then one download read to the end; prints JSON seconds.
CLIENT = r"""
import json, os, time, urllib.request
proxy = os.environ.get("HTTP_PROXY")
o = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy} if proxy else {}))
small = []
for _ in range(N):
    t = time.perf_counter()
    o.open(BASE + "/small", timeout=60).read()
    small.append(time.perf_counter() - t)
t = time.perf_counter()
r = o.open(BASE + "/big", timeout=600)
got = 0
while True:
    b = r.read(1 << 20)
    if not b:
        break
    got += len(b)
print(json.dumps({"small": small, "big_s": time.perf_counter() - t, "bytes": got}))
"""


class _Index:
    def __init__(self, big: int):
        body = b"\0" * CHUNK

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                size = big if self.path == "/big" else 64
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                left = size
                while left > 0:
                    self.wfile.write(body[: min(left, CHUNK)])
                    left -= CHUNK

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://{HOST}:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _program(base: str, n: int) -> str:
    return f"N = {n}\nBASE = {base!r}\n" + CLIENT


async def _in_sandbox(runtime: str, base: str, port: int, n: int) -> dict:
    settings = dataclasses.replace(
        load(SandboxSettings),
        runtime=runtime,
        pool_size=0,
        namespace="bench-egress",
        egress_allow=[f"{HOST}:{port}"],
        egress_allow_private=[HOST],
        egress_max_bytes=1 << 40,
    )
    eng = Engine(DockerBackend(settings), settings)
    await eng.start()
    try:
        sb = await eng.acquire()
        sb.egress.bind(EgressOwner(user="bench", session=sb.session_id, policy=sb.egress.policy))
        lines: list[str] = []

        async def on_event(ev):
            if ev.get("ev") == "out" and ev.get("s") == "stdout":
                lines.extend(ev["lines"])

        done = await sb.request("run_code", {"code": _program(base, n), "timeout_s": 600}, on_event, deadline_s=700)
        if not done.get("ok"):
            raise RuntimeError(f"the sandbox's client failed: {done.get('error')}")
        return json.loads("".join(lines).strip().splitlines()[-1])
    finally:
        await eng.close()


def _on_host(base: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _program(base, n)], capture_output=True, text=True, timeout=600, env={}, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def run(table: Table, smoke: bool = False, runtimes: tuple[str, ...] = ("runc", "runsc")) -> None:
    n = 5 if smoke else 50
    big = (5 if smoke else 50) << 20
    index = _Index(big)
    try:
        port = index.httpd.server_address[1]
        direct = await asyncio.to_thread(_on_host, index.base, n)
        d = summary_ms(direct["small"])
        table.add("egress: small GET, direct on the host", f"p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms")
        mb = big / (1 << 20)
        table.add(f"egress: {mb:.0f} MB download, direct on the host", f"{mb / direct['big_s']:.0f} MB/s")
        for runtime in runtimes:
            got = await _in_sandbox(runtime, index.base, port, n)
            s = summary_ms(got["small"])
            table.add(
                f"egress[{runtime}]: small GET through the proxy",
                f"p50 {s['p50']:.2f} ms (+{s['p50'] - d['p50']:.2f}), p99 {s['p99']:.2f} ms",
            )
            table.add(
                f"egress[{runtime}]: {mb:.0f} MB download through the proxy",
                f"{mb / got['big_s']:.0f} MB/s ({got['big_s']:.2f} s)",
            )
    finally:
        index.close()
