"""The local backend: the same agent as a plain subprocess. NO ISOLATION.

For development on a machine without Docker, and only when chosen explicitly
(``GROUNDLOOP_SANDBOX_BACKEND=local``) or allowed as a fallback on a
loopback-only server. The code runs as the server's user, on the server's
network and file system, in a temporary directory of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import uuid

from .base import Sandbox, SandboxUnavailable
from .settings import SandboxSettings

log = logging.getLogger("groundloop.sandbox")
# The folder that holds the agent package (groundloop_agent), run with -m from there.
AGENT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent")
AGENT_ARGV = ["-u", "-B", "-P", "-m", "groundloop_agent"]


class LocalBackend:
    name = "local"
    runtime = "none"

    def __init__(self, settings: SandboxSettings):
        self.settings = settings
        self._procs: dict[str, tuple[asyncio.subprocess.Process, str]] = {}
        log.warning(
            "LOCAL SANDBOX BACKEND: code runs unisolated as %s on this machine; "
            "never use it where the code is not trusted",
            os.environ.get("USER", "this user"),
        )

    async def ping(self) -> bool:
        return True

    async def reap_orphans(self) -> int:
        return 0

    async def start(self, session_id: str) -> Sandbox:
        workdir = tempfile.mkdtemp(prefix="groundloop-")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": workdir,
            "GROUNDLOOP_WORKDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONPATH": AGENT_PATH,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *AGENT_ARGV,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,
                env=env,
                cwd=workdir,
                start_new_session=True,
                limit=1 << 20,
            )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise SandboxUnavailable(f"could not start the local agent: {exc}") from exc
        sid = f"local-{uuid.uuid4().hex}"
        self._procs[sid] = (proc, workdir)
        assert proc.stdout is not None and proc.stdin is not None
        sb = Sandbox(
            sandbox_id=sid,
            session_id=session_id,
            backend=self.name,
            runtime=self.runtime,
            image="local",
            reader=proc.stdout,
            writer=proc.stdin,
            docker_mux=False,
            closer=self._close_sandbox,
            max_frame_bytes=self.settings.max_frame_bytes,
        )
        await sb.handshake_or_close(self.settings.start_timeout_s)
        return sb

    async def _close_sandbox(self, sb: Sandbox) -> None:
        proc, workdir = self._procs.pop(sb.id, (None, None))
        if proc is not None:
            # Its stdin is closed: the agent stops its children and exits.
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
                await proc.wait()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    async def close(self) -> None:
        return None
