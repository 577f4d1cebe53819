"""The server image (deploy/server.Dockerfile), built offline, runs a session against the host's engine.

The image is built by deploy/server_image.py (.ci/run does it first; here it is
built when missing or older than the sources: minutes on a fresh machine). The
container runs as compose runs it (read-only, no capability, the host's Docker
socket and its group), published on a loopback port only. A session runs code
through it; ``docker stop`` drains it (exit 0) and no sandbox is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from pathlib import Path

import httpx
import pytest
from support.env import IMAGE, NAMESPACE
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVER_IMAGE = os.environ.get("GROUNDLOOP_SERVER_IMAGE", "groundloop-server:test")
SOCKET = "/var/run/docker.sock"
WAIT = 120.0


def builder():
    spec = importlib.util.spec_from_file_location("server_image", ROOT / "deploy" / "server_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def namespace_containers(client, ns: str) -> list[dict]:
    return client.api.containers(all=True, filters={"label": [f"groundloop.namespace={ns}"]})


async def test_server_image_runs_a_session():
    import docker

    if not os.path.exists(SOCKET):
        pytest.skip(f"no Docker socket at {SOCKET} to mount")
    client = await asyncio.to_thread(docker.from_env, timeout=900)
    ns = f"{NAMESPACE}-image"
    container = None
    try:
        await asyncio.to_thread(builder().build, SERVER_IMAGE, client=client)
        container = await asyncio.to_thread(
            client.containers.run,
            SERVER_IMAGE,
            detach=True,
            ports={"8000/tcp": ("127.0.0.1", None)},
            volumes={SOCKET: {"bind": SOCKET, "mode": "rw"}},
            group_add=[str(os.stat(SOCKET).st_gid)],
            environment={
                "GROUNDLOOP_TOKENS": "tok1:alice",
                "GROUNDLOOP_SANDBOX_IMAGE": IMAGE,
                "GROUNDLOOP_NAMESPACE": ns,
                "GROUNDLOOP_POOL_SIZE": "1",
                "GROUNDLOOP_SERVER_ID": "image-1",
                "GROUNDLOOP_DRAIN_S": "20",
            },
            read_only=True,
            tmpfs={"/tmp": ""},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            labels={"groundloop.test": NAMESPACE},
        )
        await asyncio.to_thread(container.reload)
        port = int(container.ports["8000/tcp"][0]["HostPort"])
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + WAIT
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(base + "/readyz")).status_code == 200:
                        break
                await asyncio.to_thread(container.reload)
                assert container.status == "running" and time.monotonic() < end, container.logs()[-3000:].decode()
                await asyncio.sleep(0.3)
        async with await WSClient.connect(f"ws://127.0.0.1:{port}/v1/ws", token="tok1") as c:
            assert c.session_id.startswith("image-1.")
            frames = await c.request("run_code", code="import sys\nprint(sys.version_info[0])\n6 * 7")
            assert frames[-1]["ok"], frames[-1]
            assert WSClient.text(frames) == "3\n"
            assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == ["42"]
        # docker stop sends SIGTERM: the server drains and exits by itself, before the kill.
        await asyncio.to_thread(container.stop, timeout=60)
        status = await asyncio.to_thread(container.wait, timeout=WAIT)
        logs = container.logs().decode(errors="replace")
        assert status["StatusCode"] == 0, logs[-3000:]
        assert "drained" in logs, logs[-3000:]
        end = time.monotonic() + WAIT
        while left := [c for c in await asyncio.to_thread(namespace_containers, client, ns) if c["State"] == "running"]:
            assert time.monotonic() < end, left
            await asyncio.sleep(0.3)
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(container.remove, force=True)
        for c in await asyncio.to_thread(namespace_containers, client, ns):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.api.remove_container, c["Id"], force=True)
        client.close()
