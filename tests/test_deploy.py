"""deploy/: a real Prometheus scraping groundloop metrics, and the manifests' consistency.

The Prometheus test starts /usr/bin/prometheus on loopback with a config made
from deploy/prometheus.yml (targets replaced, scrape interval 1 s, temporary
storage). Without Prometheus it is skipped, unless GROUNDLOOP_REQUIRE_DOCKER=1
(CI), where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from groundloop.server.metrics import Metrics
from test_metrics import dashboard_queries

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
REQUIRE = os.environ.get("GROUNDLOOP_REQUIRE_DOCKER") == "1"
READY_LINE = "Server is ready to receive web requests"


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if os.access(f"/usr/bin/{tool}", os.X_OK) else None)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{tool} is missing (CI installs Debian's prometheus package)")
        pytest.skip(f"{tool} is not installed (apt-get install prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(targets: list[str], interval: str = "1s") -> str:
    """deploy/prometheus.yml with its scrape targets replaced and every interval set to ``interval``."""
    text = PROMETHEUS_YML.read_text()
    block = re.search(r"^( *)- targets:\n((?:\1  +- .*\n)+)", text, re.M)
    assert block, "deploy/prometheus.yml has no static targets list"
    indent = block.group(1) + "    "
    text = text.replace(block.group(2), "".join(f"{indent}- {t}\n" for t in targets))
    text, n = re.subn(r"(scrape_interval|scrape_timeout|evaluation_interval): *\S+", rf"\1: {interval}", text)
    assert n >= 2
    return text


@contextlib.asynccontextmanager
async def running_prometheus(config: str, tmp_path: Path) -> AsyncIterator[str]:
    """A real Prometheus on 127.0.0.1 with ``config``; yields its base URL."""
    binary = need("prometheus")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(config)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log: list[str] = []
    ready = asyncio.Event()

    async def drain():
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode(errors="replace"))
            if READY_LINE in log[-1]:
                ready.set()

    drainer = asyncio.create_task(drain(), name="prometheus-log")
    try:
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, drainer}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert ready.is_set(), "Prometheus did not become ready:\n" + "".join(log[-30:])
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer


async def query(client: httpx.AsyncClient, base: str, promql: str) -> dict:
    r = await client.get(f"{base}/api/v1/query", params={"query": promql})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]


async def query_until(client: httpx.AsyncClient, base: str, promql: str, timeout_s: float = 60) -> list[dict]:
    """Poll an external Prometheus until ``promql`` has a result (it scrapes on its own clock)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = (await query(client, base, promql))["result"]
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.25)


@contextlib.contextmanager
def exposition_server(metrics: Metrics):
    """A tiny HTTP server on 127.0.0.1 serving ``metrics`` at /metrics; yields its host:port."""
    from prometheus_client import start_http_server

    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield f"127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def dashboard_as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by plain PromQL."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


# ---- Prometheus


def test_prometheus_config_is_valid(tmp_path):
    tool = need("promtool")
    for text in (PROMETHEUS_YML.read_text(), prometheus_config(["127.0.0.1:1234"])):
        cfg = tmp_path / "p.yml"
        cfg.write_text(text)
        proc = subprocess.run([tool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "127.0.0.1:1234" in prometheus_config(["127.0.0.1:1234"])
    assert "server:8000" not in prometheus_config(["127.0.0.1:1234"])


@pytest.mark.slow
async def test_real_prometheus_scrapes_groundloop_metrics(tmp_path):
    metrics = Metrics()
    metrics.set_pool_size(7)
    metrics.request_done("run_code", "ok", 0.0005)
    with exposition_server(metrics) as target:
        async with running_prometheus(prometheus_config([target]), tmp_path) as base:
            async with httpx.AsyncClient(timeout=30) as client:
                up = await query_until(client, base, 'up{job="groundloop"} == 1')
                assert up and up[0]["metric"]["instance"] == target
                result = await query_until(client, base, "groundloop_sandbox_pool_size")
                assert result and result[0]["value"][1] == "7"
                result = await query_until(client, base, 'groundloop_requests_total{type="run_code",outcome="ok"}')
                assert result and result[0]["value"][1] == "1"
                # Every dashboard expression is valid PromQL for this Prometheus.
                for expr in dashboard_queries():
                    if expr.startswith("label_values("):
                        continue  # a Grafana function, not PromQL
                    await query(client, base, dashboard_as_promql(expr))


@pytest.mark.slow
@pytest.mark.docker
async def test_real_prometheus_scrapes_the_server(tmp_path):
    from conftest import run_server
    from wsclient import WSClient

    async with run_server() as server:
        async with await WSClient.connect(server.url, token="tok1") as c:
            assert (await c.call("run_code", code="print(6 * 7)"))["ok"] is True
            target = f"127.0.0.1:{server.port}"
            async with running_prometheus(prometheus_config([target]), tmp_path) as base:
                async with httpx.AsyncClient(timeout=30) as client:
                    promql = 'groundloop_execution_seconds_count{kind="run_code",language="python",outcome="ok"}'
                    result = await query_until(client, base, promql)
                    assert result and result[0]["metric"]["instance"] == target
                    assert float(result[0]["value"][1]) == 1
                    result = await query_until(client, base, "groundloop_connections")
                    assert result and result[0]["value"][1] == "1"


# ---- Grafana provisioning


def test_grafana_provisioning_points_at_the_dashboard():
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the provisioning files")
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/groundloop.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads((DEPLOY / "grafana/dashboards/groundloop.json").read_text())
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == uid
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    path = prov["providers"][0]["options"]["path"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ---- compose and the server image


def test_compose_runs_the_server_with_prometheus():
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server = compose["services"]["server"]
    assert server["build"]["dockerfile"] == "deploy/server.Dockerfile"
    assert any(v.endswith(":/var/run/docker.sock") for v in server["volumes"])
    assert "GROUNDLOOP_TOKENS" in server["environment"]
    text = (DEPLOY / "compose.yaml").read_text()
    assert "root on the host" in text and "runsc" in text and "rootless" in text
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    # The scrape target is the compose service name and the server's port.
    assert f"server:{server['environment']['GROUNDLOOP_PORT']}" in PROMETHEUS_YML.read_text()


def test_server_dockerfile():
    text = (DEPLOY / "server.Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE\}", text, re.M) and "python:3" in text and "slim" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd, "no exec-form CMD"
    argv = json.loads(cmd.group(1))
    assert argv[:4] == ["groundloop", "serve", "--host", "0.0.0.0"]
    assert "GROUNDLOOP_TOKENS" in text and "USER 10001" in text
    # Everything the image copies exists in the repository.
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"server.Dockerfile copies {src}, which does not exist"


# ---- Kubernetes


def k8s_documents() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_k8s_deployment_has_probes_limits_and_scraping():
    docs = {d["kind"]: d for d in k8s_documents()}
    for kind in ("Deployment", "Service", "ServiceMonitor", "Ingress"):
        assert kind in docs, kind
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"] and container["resources"]["limits"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    sock = [v for v in pod["spec"]["volumes"] if v.get("hostPath", {}).get("path") == "/var/run/docker.sock"]
    assert sock, "the server needs its node's Docker socket"
    text = (DEPLOY / "k8s/deployment.yaml").read_text()
    assert "runsc" in text and "root on that node" in text
    assert docs["Service"]["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kind: Deployment" in proc.stdout


def test_sandbox_image_context_carries_the_statx_shim(monkeypatch):
    """The image build compiles deploy/statx_shim.c on the host (docs/security.md, item 7): the context has
    the library, which defines statx() and needs nothing newer than glibc 2.2.5; without a compiler the
    build says which packages to install."""
    import io
    import tarfile
    import tempfile

    from groundloop.sandbox import image

    with tarfile.open(fileobj=io.BytesIO(image.build_context())) as tar:
        names = tar.getnames()
        assert {"Dockerfile", "statx_shim.so", *image.AGENT_FILES} <= set(names)
        with tempfile.TemporaryDirectory() as tmp:
            tar.extract("statx_shim.so", tmp)
            symbols = subprocess.run(
                ["objdump", "-T", os.path.join(tmp, "statx_shim.so")], capture_output=True, text=True, check=True
            ).stdout
    assert re.search(r"\.text\s.*\sstatx$", symbols, re.M), symbols
    versions = set(re.findall(r"GLIBC_([0-9.]+)", symbols))
    assert versions <= {"2.2.5"}, versions
    assert "statx_shim.so" in (DEPLOY / "sandbox.Dockerfile").read_text()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="apt-get install gcc"):
        image.build_context()
