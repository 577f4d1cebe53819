"""Snapshot and restore of a workspace directory, by ``tar`` in a helper container.

Why a container and not ``tarfile`` in the server: the workspace is the sandbox's, and the
sandbox runs while it is read or written. A host process (root) walking it could be raced
into following a symbolic link the code swaps in (reading a host file into a snapshot, or
writing through a link on restore). ``tar`` in a hardened container of the sandbox image,
as the sandbox uid, with only the workspace and that workspace's snapshot directory mounted,
can reach nothing else, whatever the tree holds. The tar streams from disk to disk, so memory
stays bounded, and the snapshot is written on the user's storage: it counts against the quota
(loop mode: tar ends with ENOSPC, answered as ``QuotaExceeded``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .docker_backend import LABEL, SANDBOX_USER, hardening
from .settings import SandboxSettings

# `set -e` and the trap: a snapshot that fails half way (out of space) leaves no partial tar.
SNAPSHOT_SH = (
    'set -e; t="/snapshots/.partial-$SNAP"; trap \'rm -f "$t"\' EXIT; '
    'tar -cf "$t" -C /workspace .; mv -f "$t" "/snapshots/$SNAP.tar"'
)
# chmod first: a directory the code made read-only would keep its files from deletion.
RESTORE_SH = (
    "set -e; chmod -R u+rwX /workspace 2>/dev/null || true; "
    "find /workspace -mindepth 1 -maxdepth 1 -exec rm -rf {} +; "
    'tar -xf "/snapshots/$SNAP.tar" -C /workspace --no-same-owner'
)
OUTPUT_MAX = 4096


class ToolFailed(Exception):
    def __init__(self, message: str, out_of_space: bool = False):
        super().__init__(message)
        self.out_of_space = out_of_space


class WorkspaceTools:
    """Runs the helper containers; ``client`` is the docker SDK client of the sandbox backend."""

    def __init__(self, settings: SandboxSettings, client: Any, labels: dict[str, str]):
        self.settings = settings
        self.client = client
        self.labels = {**labels, LABEL: "true", "groundloop.role": "workspace-tool"}

    async def snapshot(self, workspace: str, snapshots: str, snapshot_id: str) -> None:
        await asyncio.to_thread(self._run, SNAPSHOT_SH, workspace, snapshots, snapshot_id, snapshots_rw=True)

    async def restore(self, workspace: str, snapshots: str, snapshot_id: str) -> None:
        await asyncio.to_thread(self._run, RESTORE_SH, workspace, snapshots, snapshot_id, snapshots_rw=False)

    def _run(self, script: str, workspace: str, snapshots: str, snapshot_id: str, snapshots_rw: bool) -> None:
        import docker.types

        api = self.client.api
        hc = hardening(self.settings)
        hc["tmpfs"] = {"/tmp": hc["tmpfs"]["/tmp"]}
        hc["binds"] = {
            workspace: {"bind": "/workspace", "mode": "rw"},
            snapshots: {"bind": "/snapshots", "mode": "rw" if snapshots_rw else "ro"},
        }
        hc["auto_remove"] = False  # its output is read after it exits
        hc["log_config"] = docker.types.LogConfig(type="json-file", config={"max-size": "64k"})
        created = api.create_container(
            self.settings.image,
            command=["/bin/sh", "-c", script],
            user=SANDBOX_USER,
            working_dir="/",
            environment={"SNAP": snapshot_id, "LANG": "C.UTF-8"},
            labels=self.labels,
            network_disabled=True,
            host_config=api.create_host_config(**hc),
        )
        cid = created["Id"]
        try:
            api.start(cid)
            code = api.wait(cid, timeout=self.settings.max_exec_timeout_s + 60).get("StatusCode")
            if code != 0:
                out = api.logs(cid, stdout=True, stderr=True)[-OUTPUT_MAX:].decode("utf-8", "replace").strip()
                raise ToolFailed(out or f"tar exited with {code}", out_of_space="No space left" in out)
        finally:
            try:
                api.remove_container(cid, force=True)
            except Exception:  # pragma: no cover - docker trouble; the namespace reaper takes it later
                pass
