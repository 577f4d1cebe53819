"""The Docker backend: hardened containers, the agent on their attached stdio.

Every docker SDK call blocks, so each runs in a worker thread. The attach
socket is taken over as a plain non-blocking socket: the SDK is not involved
in moving bytes. The container is attached *before* it starts, so the agent's
hello cannot be missed; stdin is "once", so when the server's end of the
socket closes (even when the server is killed) the agent reads EOF, exits,
and ``auto_remove`` makes Docker delete the container.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import Any

from .base import Sandbox, SandboxUnavailable
from .settings import SandboxSettings, parse_size

log = logging.getLogger("groundloop.sandbox")

LABEL = "groundloop.managed"
# -P: /workspace (the working directory, writable by the code) never goes on the agent's import path;
# the image sets PYTHONPATH=/opt/groundloop, where the agent package is.
AGENT_CMD = ["python3", "-u", "-B", "-P", "-m", "groundloop_agent"]
SANDBOX_USER = "1000:1000"


def hardening(settings: SandboxSettings) -> dict[str, Any]:
    """Host config of every sandbox container (keyword arguments of create_host_config)."""
    import docker.types

    mem = parse_size(settings.memory)
    return {
        # No docker-init: it would hold the agent's stdio as a dumpable pid 1, open to the code
        # through /proc/1/fd. The agent's own pid 1 reaps instead (sandbox/agent/groundloop_agent/init.py).
        "init": False,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {
            "/tmp": f"rw,nosuid,nodev,size={settings.tmp_size},mode=1777",
            "/workspace": f"rw,nosuid,nodev,size={settings.workspace_size},uid=1000,gid=1000,mode=0755",
        },
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": settings.pids_limit,
        "mem_limit": mem,
        "memswap_limit": mem,
        "nano_cpus": int(settings.cpus * 1e9),
        "ulimits": [
            docker.types.Ulimit(name="nofile", soft=settings.nofile, hard=settings.nofile),
            docker.types.Ulimit(name="fsize", soft=settings.max_file_bytes, hard=settings.max_file_bytes),
        ],
        "log_config": docker.types.LogConfig(type="none"),
        "auto_remove": True,
        "ipc_mode": "private",
        "runtime": settings.runtime or None,
    }


class DockerBackend:
    name = "docker"

    def __init__(self, settings: SandboxSettings, instance: str | None = None, client: Any = None):
        self.settings = settings
        self.runtime = settings.runtime or "runc"
        self.instance = instance or secrets.token_hex(6)
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import docker

            self._client = docker.from_env(timeout=60)
        return self._client

    def labels(self, session_id: str) -> dict[str, str]:
        return {
            LABEL: "true",
            "groundloop.namespace": self.settings.namespace,
            "groundloop.instance": self.instance,
            "groundloop.session": session_id,
        }

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.to_thread(self.client.ping))
        except Exception:
            return False

    async def image_present(self) -> bool:
        import docker.errors

        try:
            await asyncio.to_thread(self.client.images.get, self.settings.image)
            return True
        except docker.errors.ImageNotFound:
            return False

    async def reap_orphans(self) -> int:
        """Remove this namespace's containers left by a server that is gone."""
        return await asyncio.to_thread(
            self._reap, {"groundloop.namespace": self.settings.namespace}, exclude_instance=self.instance
        )

    async def reap_all(self) -> int:
        """Remove every container of this server instance."""
        return await asyncio.to_thread(self._reap, {"groundloop.instance": self.instance})

    def _reap(self, match: dict[str, str], exclude_instance: str | None = None) -> int:
        filters = {"label": [f"{LABEL}=true"] + [f"{k}={v}" for k, v in match.items()]}
        n = 0
        for c in self.client.api.containers(all=True, filters=filters):
            if exclude_instance and c["Labels"].get("groundloop.instance") == exclude_instance:
                continue
            self.remove(c["Id"])
            n += 1
        return n

    def remove(self, cid: str) -> None:
        import docker.errors

        try:
            self.client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress (auto_remove)
                raise

    def create_and_attach(self, session_id: str, command: list[str] = AGENT_CMD) -> tuple[str, socket.socket]:
        """Create a hardened container running ``command``, attach a non-blocking socket to its
        stdio and start it (blocking: call it in a thread). The bench runs ``cat`` this way."""
        api = self.client.api
        host_config = api.create_host_config(**hardening(self.settings))
        created = api.create_container(
            self.settings.image,
            command=command,
            stdin_open=True,
            detach=False,
            tty=False,
            user=SANDBOX_USER,
            working_dir="/workspace",
            hostname="sandbox",
            environment={"HOME": "/workspace", "LANG": "C.UTF-8"},
            labels=self.labels(session_id),
            network_disabled=True,
            host_config=host_config,
        )
        cid = created["Id"]
        try:
            raw = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            inner = getattr(raw, "_sock", raw)
            # Own a duplicate of the descriptor: the SDK's objects may close theirs.
            sock = socket.socket(fileno=os.dup(inner.fileno()))
            for obj in (raw, inner):
                try:
                    obj.close()
                except Exception:
                    pass
            sock.setblocking(False)
            api.start(cid)
        except BaseException:
            self.remove(cid)
            raise
        return cid, sock

    async def start(self, session_id: str) -> Sandbox:
        # The thread cannot be cancelled: if we are, wait for it and undo its work,
        # so no container or socket is left without an owner.
        work = asyncio.ensure_future(asyncio.to_thread(self.create_and_attach, session_id))
        try:
            cid, sock = await asyncio.shield(work)
        except asyncio.CancelledError:
            try:
                cid, sock = await work
            except Exception:
                raise asyncio.CancelledError from None
            sock.close()
            await asyncio.to_thread(self.remove, cid)
            raise
        except Exception as exc:
            raise SandboxUnavailable(f"could not start a sandbox container: {exc}") from exc
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        sb = Sandbox(
            sandbox_id=cid,
            session_id=session_id,
            backend=self.name,
            runtime=self.runtime,
            image=self.settings.image,
            reader=reader,
            writer=writer,
            docker_mux=True,
            closer=self._close_sandbox,
            max_frame_bytes=self.settings.max_frame_bytes,
        )
        try:
            await sb.handshake(self.settings.start_timeout_s)
        except BaseException:
            await sb.close()
            raise
        return sb

    async def _close_sandbox(self, sb: Sandbox) -> None:
        try:
            await asyncio.to_thread(self.remove, sb.id)
        except Exception as exc:
            log.warning("could not remove container %s: %s", sb.id[:12], exc)

    async def kill(self, sb: Sandbox) -> None:
        """Kill the container from outside (for tests of faults)."""
        await asyncio.to_thread(self.client.api.kill, sb.id)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
