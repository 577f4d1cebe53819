"""The Docker backend: hardened containers, the agent on their attached stdio.

Every docker SDK call blocks, so each runs in a worker thread. The attach
socket is taken over as a plain non-blocking socket: the SDK is not involved
in moving bytes. The container is attached *before* it starts, so the agent's
hello cannot be missed; stdin is "once", so when the server's end of the
socket closes (even when the server is killed) the agent reads EOF, exits,
and ``auto_remove`` makes Docker delete the container.

When Docker runs on this host, each sandbox also gets a host directory of its
own (sandbox/rundir.py) with a socket the server listens on, and the agent's
frames take that socket instead of the attach stream (sandbox/channel.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from . import rundir
from .base import Sandbox, SandboxUnavailable
from .channel import SocketOffer
from .egress import EgressGate, EgressPolicy
from .settings import SandboxSettings, parse_size

log = logging.getLogger("groundloop.sandbox")

LABEL = "groundloop.managed"
# -P: /workspace (the working directory, writable by the code) never goes on the agent's import path;
# the image sets PYTHONPATH=/opt/groundloop, where the agent package is. -S: the agent is stdlib-only, so
# `site` (dist-packages, user site) is 8 ms of its start it does not need; its children start without -S.
AGENT_CMD = ["python3", "-u", "-B", "-P", "-S", "-m", "groundloop_agent"]
SANDBOX_USER = "1000:1000"

# Under gVisor the host sees the Sentry, the gofer and one ptrace stub process per guest process,
# with a stub thread per Sentry thread that ran it: a Python fork bomb measured ~22 host tasks per
# guest process (128 guest processes: 2284 host tasks) over a base of ~60. When the host pids limit
# is reached the Sentry panics ("error initializing first thread") and the whole sandbox is lost.
# So under runsc the guest's own count is capped by RLIMIT_NPROC (the Sentry enforces it per
# sandbox, threads included), and the host limit is set far enough above it never to be reached.
GVISOR_HOST_TASKS_PER_PROCESS = 24
GVISOR_HOST_TASKS_BASE = 128
# Under gVisor a host OOM kill loses the whole sandbox too (the Sentry kills itself when the OOM
# killer takes one of its stubs), so the agent's memory guard kills the largest process session
# when the guest's memory use passes the limit less this reserve: the Sentry's own ~45 MiB (its
# heap and the runsc binary's pages), plus what a bomb adds before the guard runs (0-14 MiB on an
# idle machine, 34 MiB under load, and once more than a 48 MiB reserve at 256 MiB). A small limit
# keeps at least half for the guest. See docs/security.md, item 8.
GVISOR_MEMORY_RESERVE = 64 << 20
GVISOR_MEMORY_RESERVE_FRACTION = 0.1
# And each guest process costs memory: a Python fork bomb (128 processes, 1 GiB limit) peaked at
# 508 MiB of guest memory and 56 MiB of host kernel memory for the stubs' tasks; at 256 MiB and 42
# processes the OOM killer struck at 222 MiB of guest memory: ~5 MiB a forked worker. A fork bomb
# outruns a watchdog inside the sandbox (one runnable task among a hundred), so the process cap
# keeps a fork bomb of small processes under the guard's threshold (the agent and a worker: ~32 MiB).
GVISOR_MEMORY_PER_PROCESS = 6 << 20
GVISOR_MEMORY_BASE = 32 << 20
MEMORY_GUARD_VAR = "GROUNDLOOP_MEMORY_GUARD_BYTES"


def is_gvisor(runtime: str | None) -> bool:
    """runsc, or another name registered for it (runsc-debug, ...)."""
    return runtime is not None and runtime.startswith("runsc")


def guest_process_cap(settings: SandboxSettings) -> int:
    """Processes and threads a gVisor sandbox may hold (RLIMIT_NPROC): the pids setting, lowered so
    that as many small processes fit under the memory guard's threshold."""
    fit = (guard_threshold(parse_size(settings.memory)) - GVISOR_MEMORY_BASE) // GVISOR_MEMORY_PER_PROCESS
    return max(16, min(settings.pids_limit, fit))


def guard_threshold(memory: int) -> int:
    return max(memory // 2, memory - GVISOR_MEMORY_RESERVE - int(memory * GVISOR_MEMORY_RESERVE_FRACTION))


def memory_guard_bytes(settings: SandboxSettings) -> int | None:
    """The guest memory use past which the agent kills a process session (gVisor only)."""
    if not is_gvisor(settings.runtime):
        return None
    return guard_threshold(parse_size(settings.memory))


def hardening(settings: SandboxSettings, workspace: str | None = None) -> dict[str, Any]:
    """Host config of every sandbox container (keyword arguments of create_host_config).
    ``workspace``: a host directory (sandbox/workspaces.py) bound at /workspace instead of the tmpfs."""
    import docker.types

    mem = parse_size(settings.memory)
    ulimits = [
        docker.types.Ulimit(name="nofile", soft=settings.nofile, hard=settings.nofile),
        docker.types.Ulimit(name="fsize", soft=settings.max_file_bytes, hard=settings.max_file_bytes),
    ]
    pids = settings.pids_limit
    if is_gvisor(settings.runtime):
        # Under runc, RLIMIT_NPROC would count every uid-1000 process of the host kernel, other
        # sandboxes' included: only the Sentry counts per sandbox.
        nproc = guest_process_cap(settings)
        ulimits.append(docker.types.Ulimit(name="nproc", soft=nproc, hard=nproc))
        pids = nproc * GVISOR_HOST_TASKS_PER_PROCESS + GVISOR_HOST_TASKS_BASE
    tmpfs = {
        "/tmp": f"rw,nosuid,nodev,size={settings.tmp_size},mode=1777",
        "/workspace": f"rw,nosuid,nodev,size={settings.workspace_size},uid=1000,gid=1000,mode=0755",
    }
    extra: dict[str, Any] = {}
    if workspace is not None:
        del tmpfs["/workspace"]
        extra["binds"] = {workspace: {"bind": "/workspace", "mode": "rw"}}
    return {
        # No docker-init: it would hold the agent's stdio as a dumpable pid 1, open to the code
        # through /proc/1/fd. The agent's own pid 1 reaps instead (sandbox/agent/groundloop_agent/init.py).
        "init": False,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": tmpfs,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": pids,
        "mem_limit": mem,
        "memswap_limit": mem,
        "nano_cpus": int(settings.cpus * 1e9),
        "ulimits": ulimits,
        "log_config": docker.types.LogConfig(type="none"),
        "auto_remove": True,
        "ipc_mode": "private",
        "runtime": settings.runtime or None,
        **extra,
    }


async def _shielded(
    fut: asyncio.Future[Any],
    undo: Callable[[Any], Awaitable[None]],
    failed: Callable[[], Awaitable[None]] | None = None,
) -> Any:
    """Await a thread's future. Cancelled, wait for the thread (it cannot be stopped) and undo what it
    made: ``undo(result)``, or ``failed()`` when it raised; then the cancellation goes on."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:

        async def then_undo() -> None:
            try:
                got = await fut
            except Exception:
                if failed is not None:
                    await failed()
            else:
                await undo(got)

        # Shielded too: a second cancel (a shutdown after a client went away) stops our wait, not the undo.
        await asyncio.shield(then_undo())
        raise


class DockerBackend:
    name = "docker"
    supports_workspaces = True

    def __init__(self, settings: SandboxSettings, instance: str | None = None, client: Any = None):
        self.settings = settings
        self.runtime = settings.runtime or "runc"
        self.instance = instance or secrets.token_hex(6)
        self._client = client
        self.egress_policy = EgressPolicy.from_settings(settings)
        self.run_root = rundir.root_of(settings.run_dir)
        self._rundirs: dict[str, rundir.RunDir] = {}  # container id -> its host directory
        self._socket_refused: str | None = None  # why the socket channel cannot be used here (logged once)
        self._socket_broken: str | None = None  # set when the engine could not mount a sandbox's directory
        self._lock = rundir.InstanceLock(self.run_root, settings.namespace, self.instance)

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
        """Remove this namespace's containers left by a server that is gone, and their host directories.
        Called once at start: it first takes this instance's lock, so other servers leave ours alone."""
        try:
            await asyncio.to_thread(self._lock.acquire)
        except OSError as exc:
            log.warning(
                "could not lock %s: another server of this namespace may take ours for gone: %s", self._lock.path, exc
            )
        alive = rundir.liveness(self.run_root, self.settings.namespace)
        n = await asyncio.to_thread(self._reap, {"groundloop.namespace": self.settings.namespace}, self.instance, alive)
        await asyncio.to_thread(rundir.reap, self.run_root, self.settings.namespace, self.instance, alive)
        return n

    async def reap_all(self) -> int:
        """Remove every container of this server instance, and their host directories."""
        n = await asyncio.to_thread(self._reap, {"groundloop.instance": self.instance})
        await asyncio.to_thread(rundir.reap_instance, self.run_root, self.settings.namespace, self.instance)
        return n

    def _reap(
        self, match: dict[str, str], exclude_instance: str | None = None, alive: Callable[[str], bool] | None = None
    ) -> int:
        """Remove the matching containers; with ``exclude_instance`` (the orphan sweep) only those of
        instances that are gone (``alive``, a rundir.liveness: a server running beside us keeps its own)."""
        filters = {"label": [f"{LABEL}=true"] + [f"{k}={v}" for k, v in match.items()]}
        if exclude_instance and alive is None:
            alive = rundir.liveness(self.run_root, self.settings.namespace)
        n = 0
        for c in self.client.api.containers(all=True, filters=filters):
            instance = c["Labels"].get("groundloop.instance", "")
            if exclude_instance and (instance == exclude_instance or (alive is not None and alive(instance))):
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

    def environment(self) -> dict[str, str]:
        env = {"HOME": "/workspace", "LANG": "C.UTF-8"}
        guard = memory_guard_bytes(self.settings)
        if guard is not None:
            env[MEMORY_GUARD_VAR] = str(guard)
        return env

    def socket_channel_refused(self) -> str | None:
        """Why this backend's sandboxes cannot have the socket channel; None when they can."""
        if self.settings.channel == "attach":
            return "GROUNDLOOP_SANDBOX_CHANNEL=attach"
        if self.settings.channel != "auto":
            return f"GROUNDLOOP_SANDBOX_CHANNEL={self.settings.channel!r} is not auto or attach"
        base_url = getattr(self.client.api, "base_url", "")
        if base_url != "http+docker://localhost":  # a Unix socket of this host; tcp://, ssh:// are elsewhere
            return f"Docker is not on this host ({base_url})"
        return self._socket_broken

    def prepare_channel(self, egress: bool = False) -> tuple[rundir.RunDir | None, SocketOffer | None]:
        """The sandbox's host directory and the socket its agent will connect to, or (None, None) for the
        attach stream alone (blocking: call it in a thread). With ``egress`` the directory is made even
        for the attach stream: the egress proxy's socket goes there too."""
        refused = self.socket_channel_refused()
        if refused is None or (egress and not self._socket_broken):
            rd = rundir.RunDir(self.run_root, self.settings.namespace, self.instance)
            try:
                rd.create()
            except OSError as exc:
                rd.remove()
                if egress:
                    log.warning("no egress for this sandbox: could not make its host directory: %s", exc)
                refused = refused or f"could not make its host directory under {self.run_root}: {exc}"
            else:
                if refused is not None:
                    return rd, None
                try:
                    return rd, SocketOffer.open(rd)
                except OSError as exc:
                    refused = f"could not listen in its host directory under {self.run_root}: {exc}"
                    if egress:
                        self._log_refused(refused)
                        return rd, None
                    rd.remove()
        self._log_refused(refused)
        return None, None

    def _log_refused(self, refused: str | None) -> None:
        if refused != self._socket_refused:
            self._socket_refused = refused
            log.info("sandboxes use the attach stream for their data, not a socket: %s", refused)

    def create_and_attach(
        self,
        session_id: str,
        command: list[str] = AGENT_CMD,
        run_dir: rundir.RunDir | None = None,
        extra_env: dict[str, str] | None = None,
        workspace: str | None = None,
    ) -> tuple[str, socket.socket]:
        """Create a hardened container running ``command``, attach a non-blocking socket to its
        stdio and start it (blocking: call it in a thread). The bench runs ``cat`` this way.
        ``run_dir`` is mounted read-only at /run/groundloop (sandbox/rundir.py); ``workspace`` (a host
        directory, sandbox/workspaces.py) at /workspace."""
        api = self.client.api
        config = hardening(self.settings, workspace)
        if run_dir is not None:
            import docker.types

            # A mount, not a bind: the engine refuses a source it does not have instead of making an empty one.
            config["mounts"] = [docker.types.Mount(rundir.MOUNT, run_dir.path, type="bind", read_only=True)]
        host_config = api.create_host_config(**config)
        created = api.create_container(
            self.settings.image,
            command=command,
            stdin_open=True,
            detach=False,
            tty=False,
            user=SANDBOX_USER,
            working_dir="/workspace",
            hostname="sandbox",
            environment={**self.environment(), **(extra_env or {})},
            labels=self.labels(session_id),
            network_disabled=True,
            host_config=host_config,
        )
        cid = created["Id"]
        sock: socket.socket | None = None
        try:
            raw = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            inner = getattr(raw, "_sock", raw)
            try:
                # Own a duplicate of the descriptor: the SDK's objects may close theirs.
                sock = socket.socket(fileno=os.dup(inner.fileno()))
            finally:
                for obj in (raw, inner):
                    try:
                        obj.close()
                    except Exception:
                        pass
            sock.setblocking(False)
            api.start(cid)
        except BaseException:
            if sock is not None:
                sock.close()
            self.remove(cid)
            raise
        return cid, sock

    def _create(
        self,
        session_id: str,
        rd: rundir.RunDir | None,
        offer: SocketOffer | None,
        workspace: str | None,
    ) -> tuple[str, socket.socket, rundir.RunDir | None, SocketOffer | None]:
        import docker.errors

        try:
            cid, sock = self.create_and_attach(
                session_id,
                run_dir=rd,
                extra_env=offer.environment() if offer is not None else None,
                workspace=workspace,
            )
        except BaseException as exc:
            if offer is not None:
                offer.close()
            if rd is not None:
                rd.remove()
            if rd is not None and isinstance(exc, docker.errors.APIError) and "bind source path" in str(exc):
                # The engine does not see this server's files (a server in a container, the engine on its
                # host): from now on, the attach stream alone (and no egress).
                self._socket_broken = f"the engine cannot mount {self.run_root} (set GROUNDLOOP_RUN_DIR): {exc}"
                return (*self.create_and_attach(session_id, workspace=workspace), None, None)
            raise
        return cid, sock, rd, offer

    async def _egress_gate(self, rd: rundir.RunDir | None) -> EgressGate | None:
        """The sandbox's egress gate in its directory, when the operator allows any egress (the socket
        exists before the container starts: the agent looks for it once, at boot)."""
        if rd is None or not self.egress_policy.enabled:
            return None
        gate = EgressGate(rd.socket_path(rundir.EGRESS_SOCK), self.egress_policy)
        try:
            await gate.start(await asyncio.to_thread(rd.listen, rundir.EGRESS_SOCK, 128))
        except OSError as exc:  # the sandbox starts without egress (its ready says so) rather than not at all
            await gate.close()
            log.warning("no egress for this sandbox: its gate could not listen: %s", exc)
            return None
        except BaseException:
            await gate.close()
            raise
        return gate

    async def start(self, session_id: str, workspace: str | None = None) -> Sandbox:
        # Each step that makes something (a directory, a socket, a gate, a container) is undone, in the
        # reverse order, when a later one fails or the start is cancelled: nothing is left without an owner.
        # A thread cannot be cancelled: when we are, we wait for it and undo what it made.
        prepared = asyncio.ensure_future(asyncio.to_thread(self.prepare_channel, self.egress_policy.enabled))
        rd, offer = await _shielded(prepared, lambda got: self._undo(*got))
        try:
            gate = await self._egress_gate(rd)
        except BaseException:
            await self._undo(rd, offer)
            raise
        work = asyncio.ensure_future(asyncio.to_thread(self._create, session_id, rd, offer, workspace))
        try:  # _create cleans up after itself when it fails: then only the gate is ours to close
            cid, sock, rd, offer = await _shielded(
                work,
                lambda got: self._undo(got[2], got[3], gate, got[1], got[0]),
                lambda: self._undo(gate=gate),
            )
        except Exception as exc:
            await self._undo(gate=gate)
            raise SandboxUnavailable(f"could not start a sandbox container: {exc}") from exc
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except BaseException:  # cancelled (or failed) between the container and its Sandbox: undo it all
            await asyncio.shield(self._undo(rd, offer, gate, sock, cid))
            raise
        if rd is not None:
            self._rundirs[cid] = rd
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
        if rd is None and gate is not None:  # the engine could not mount the directory: no egress either
            await gate.close()
            gate = None
        sb.egress = gate
        sb.run_dir = rd.path if rd is not None else None
        if offer is not None:
            sb.offer_socket(offer)
        await sb.handshake_or_close(self.settings.start_timeout_s)
        return sb

    async def _undo(
        self,
        rd: rundir.RunDir | None = None,
        offer: SocketOffer | None = None,
        gate: EgressGate | None = None,
        sock: socket.socket | None = None,
        cid: str | None = None,
    ) -> None:
        """Undo a start that did not make a Sandbox: what it made so far, in the reverse order."""
        if sock is not None:
            sock.close()
        if offer is not None:
            offer.close()
        if cid is not None:
            try:
                await asyncio.to_thread(self.remove, cid)
            except Exception as exc:
                log.warning("could not remove container %s: %s", cid[:12], exc)
        if gate is not None:
            await gate.close()
        if rd is not None:
            await asyncio.to_thread(rd.remove)

    async def _close_sandbox(self, sb: Sandbox) -> None:
        if sb.egress is not None:
            await sb.egress.close()
        await self._close_container(sb.id)

    async def _close_container(self, cid: str) -> None:
        """Remove the container and its host directory."""
        try:
            await asyncio.to_thread(self.remove, cid)
        except Exception as exc:
            log.warning("could not remove container %s: %s", cid[:12], exc)
        rd = self._rundirs.pop(cid, None)
        if rd is not None:
            await asyncio.to_thread(rd.remove)

    async def kill(self, sb: Sandbox) -> None:
        """Kill the container from outside (for tests of faults)."""
        await asyncio.to_thread(self.client.api.kill, sb.id)

    async def close(self) -> None:
        self._lock.release()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
