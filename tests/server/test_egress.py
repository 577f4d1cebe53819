"""Egress under policy (issue 17), over the real WebSocket, under runc and runsc.

Hermetic: the only remote is a package index this test starts on 127.0.0.2 (support/pkgindex.py),
admitted through the explicit override GROUNDLOOP_EGRESS_ALLOW_PRIVATE. Every refused name is
refused before any resolution, or resolves on this machine (localhost), or is an IP literal: no
packet leaves loopback.
"""

from __future__ import annotations

import logging
import os

import orjson
import pytest
from support.env import sandbox_settings, server_settings
from support.metrics import total
from support.pkgindex import NPM_NAME, PY_MAGIC_NAME, PY_NAME, PY_VALUE, PackageIndex
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = pytest.mark.docker

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]

# A request through the sandbox's proxy, by the standard library, printing the status and the body's
# first line: what a program sees.
FETCH = """
import urllib.request, urllib.error, os
os.environ.pop("no_proxy", None); os.environ.pop("NO_PROXY", None)  # localhost too goes to the proxy here
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{"http": os.environ["HTTP_PROXY"]}}))
try:
    with opener.open({url!r}, timeout=60) as r:
        print(r.status, r.read().decode().splitlines()[0])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
"""


@pytest.fixture(scope="module")
def index():
    with PackageIndex("127.0.0.2", big_bytes=1 << 20) as idx:
        yield idx


def egress_settings(runtime: str, port: int, **overrides):
    sb = sandbox_settings(
        runtime=runtime,
        egress_allow=[f"127.0.0.2:{port}", "localhost:*", "10.1.2.3:*", "169.254.169.254", "*.invalid"],
        egress_allow_private=["127.0.0.2"],
        **overrides,
    )
    return server_settings(sandbox=sb)


async def fetch(c: WSClient, url: str) -> str:
    frames = await c.request("run_code", code=FETCH.format(url=url), timeout_s=90)
    assert frames[-1]["ok"], frames[-1].get("error")
    return WSClient.text(frames).strip()


def audit_lines(caplog) -> list[dict]:
    return [
        orjson.loads(r.getMessage())
        for r in caplog.records
        if r.name == "groundloop.audit" and '"event":"egress"' in r.getMessage()
    ]


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_policy_allows_the_index_and_refuses_the_rest(runtime, index, caplog):
    caplog.set_level(logging.INFO, logger="groundloop")
    async with run_server(egress_settings(runtime, index.port)) as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            assert c.ready["sandbox"]["egress"] is True
            # the sandbox still has no interface but lo
            done = await c.request("run_code", code="import socket; print(sorted(n for _, n in socket.if_nameindex()))")
            assert WSClient.text(done).strip() == "['lo']"

            assert await fetch(c, f"{index.url}/hello") == "200 hello from the local index"
            assert "/hello" in index.hits

            not_listed = await fetch(c, "http://pypi.example/simple/")
            assert not_listed.startswith("403 ") and "GROUNDLOOP_EGRESS_ALLOW" in not_listed, not_listed
            private = await fetch(c, "http://10.1.2.3/")
            assert private.startswith("403 ") and "private" in private, private
            loopback = await fetch(c, f"http://localhost:{index.port}/hello")
            assert loopback.startswith("403 ") and "loopback" in loopback, loopback
            assert "GROUNDLOOP_EGRESS_ALLOW_PRIVATE" in loopback
            metadata = await fetch(c, "http://169.254.169.254/latest/meta-data/")
            assert metadata.startswith("403 ") and "metadata" in metadata, metadata
            # a CONNECT tunnel (what https uses) is refused the same way, in the tool's own words
            tunnel = await c.request(
                "run_code",
                code=(
                    "import http.client\n"
                    "h = http.client.HTTPConnection('127.0.0.1', 3128, timeout=30)\n"
                    "h.set_tunnel('10.1.2.3', 443)\n"
                    "try:\n    h.connect()\nexcept OSError as e:\n    print(e)\n"
                ),
            )
            assert "403 Forbidden by groundloop egress policy" in WSClient.text(tunnel), WSClient.text(tunnel)
            session_id = c.session_id
            (held,) = [s.sb for s in srv.state.manager.sessions.values()]
            run_dir = held.run_dir
            assert os.stat(run_dir).st_mode & 0o777 == 0o700 and os.stat(run_dir).st_uid == 1000

        text = (await _metrics(srv)).decode()
        assert total(text, "groundloop_egress_connections_total", verdict="refused") >= 5
        assert total(text, "groundloop_egress_connections_total", verdict="allowed") >= 1
        assert total(text, "groundloop_egress_bytes_total", direction="in") > 0

    assert not os.path.exists(run_dir)  # removed with its sandbox
    lines = audit_lines(caplog)
    by_host = {(x["host"], x["verdict"]) for x in lines}
    assert ("127.0.0.2", "allowed") in by_host
    assert {("pypi.example", "refused"), ("10.1.2.3", "refused"), ("localhost", "refused")} <= by_host
    refused = [x for x in lines if x["host"] == "localhost"][0]
    assert refused["user"] == "alice" and refused["session"] == session_id and refused["port"] == index.port
    allowed = [x for x in lines if x["verdict"] == "allowed"][0]
    assert allowed["bytes_in"] > 0 and allowed["bytes_out"] > 0 and allowed["address"] == "127.0.0.2"


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_pip_and_npm_install_from_the_local_index(runtime, index):
    async with run_server(egress_settings(runtime, index.port)) as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            # a context that is already running imports what pip installs afterwards
            assert (await c.call("run_code", code="import sys; x = 1"))["ok"]
            pip = await c.request(
                "exec", command=f"python3 -m pip install --index-url {index.url}/simple/ {PY_NAME}", timeout_s=120
            )
            assert pip[-1]["ok"] and pip[-1]["exit_code"] == 0, (WSClient.text(pip, "stderr"), WSClient.text(pip))
            done = await c.request("run_code", code=f"import {PY_NAME}; print({PY_NAME}.VALUE)")
            assert WSClient.text(done).strip() == PY_VALUE, done

            npm = await c.request("exec", command=f"npm install --registry {index.url}/ {NPM_NAME}", timeout_s=120)
            assert npm[-1]["ok"] and npm[-1]["exit_code"] == 0, (WSClient.text(npm, "stderr"), WSClient.text(npm))
            js = await c.request("run_code", language="javascript", code=f"console.log(require('{NPM_NAME}').value)")
            assert WSClient.text(js).strip() == "required through the egress proxy", js

            # pip from a host that is not allowed says why, in pip's own output
            refused = await c.request(
                "exec",
                command=f"python3 -m pip install --retries 1 --timeout 5 --index-url https://pypi.example/simple/ {PY_NAME}-other",
                timeout_s=120,
            )
            out = WSClient.text(refused) + WSClient.text(refused, "stderr")
            assert "403 Forbidden by groundloop egress policy" in out and "GROUNDLOOP_EGRESS_ALLOW" in out, out


async def test_pip_magic_in_a_python_context(index):
    """`%pip install` in a running context (IPython's magic runs pip in a subprocess with the worker's
    environment); the package imports in that same context."""
    async with run_server(egress_settings("runc", index.port)) as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            magic = await c.request("run_code", code=f"%pip install --index-url {index.url}/simple/ {PY_MAGIC_NAME}")
            assert magic[-1]["ok"], (magic[-1].get("error"), WSClient.text(magic), WSClient.text(magic, "stderr"))
            done = await c.request("run_code", code=f"import {PY_MAGIC_NAME}; print({PY_MAGIC_NAME}.VALUE)")
            assert WSClient.text(done).strip() == PY_VALUE, done


async def test_a_session_narrows_the_list_and_never_widens_it(index):
    async with run_server(egress_settings("runc", index.port)) as srv:
        async with await WSClient.connect(srv.url + "?egress=localhost:*,example.org", token="tok1") as c:
            assert c.ready["sandbox"]["egress"] is True
            narrowed = await fetch(c, f"{index.url}/hello")
            assert narrowed.startswith("403 ") and "this session's egress list" in narrowed, narrowed
            # example.org is the session's, not the server's: still refused, before any resolution
            wider = await fetch(c, "http://example.org/")
            assert wider.startswith("403 ") and "GROUNDLOOP_EGRESS_ALLOW" in wider, wider
        async with await WSClient.connect(srv.url + "?egress=none", token="tok1") as c:
            assert c.ready["sandbox"]["egress"] is False
            assert (await fetch(c, f"{index.url}/hello")).startswith("403 ")
        async with await WSClient.connect(srv.url + "?egress=a%20b", token="tok1", expect_ready=False) as c:
            frame = await c.recv()
            assert frame["type"] == "error" and frame["code"] == "bad_request" and "egress" in frame["message"]


async def test_egress_off_by_default_leaves_no_proxy():
    async with run_server() as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            assert c.ready["sandbox"]["egress"] is False
            done = await c.request(
                "run_code",
                code="import os; print(os.path.exists('/run/groundloop/egress.sock'), 'HTTP_PROXY' in os.environ)",
            )
            assert WSClient.text(done).strip() == "False False"


async def test_the_session_byte_budget_cuts_a_download(index):
    async with run_server(egress_settings("runc", index.port, egress_max_bytes=256 << 10)) as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            got = await fetch(c, f"{index.url}/hello")
            assert got.startswith("200")
            done = await c.request(
                "run_code",
                code=(
                    "import urllib.request, os\n"
                    "o = urllib.request.build_opener(urllib.request.ProxyHandler({'http': os.environ['HTTP_PROXY']}))\n"
                    "try:\n"
                    f"    print(len(o.open('{index.url}/big', timeout=60).read()))\n"
                    "except Exception as e:\n    print(type(e).__name__)\n"
                ),
            )
            assert WSClient.text(done).strip() == "IncompleteRead", done
            spent = await fetch(c, f"{index.url}/hello")
            assert spent.startswith("403 ") and "budget" in spent, spent


async def _metrics(srv) -> bytes:
    return srv.state.metrics.exposition()
