"""The requests on a session's named workspace: ``snapshot``, ``restore``, ``list_snapshots``.

They run on the host (sessions/workspaces.py), not in the agent, and need a session opened
with ``?workspace=``; any other session gets ``done`` ``ok:false``, error name ``NoWorkspace``.
A refusal's error name comes from ``workspaces.ERROR_NAMES`` (``QuotaExceeded``, ``NotFound``...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from groundloop.sandbox.workspaces import WorkspaceError

from .inflight import InFlight
from .protocol import failure
from .workspaces import ERROR_NAMES

if TYPE_CHECKING:
    from .session import Session

WORKSPACE_REQUESTS = frozenset({"snapshot", "restore", "list_snapshots"})


async def run_workspace_request(session: Session, r: InFlight) -> dict[str, Any]:
    name = session.workspace
    if name is None:
        return _refused("no_workspace", f"{r.req.type} needs a session opened with ?workspace=<name>")
    ws = session.manager.workspaces
    p = r.req.params
    try:
        if r.req.type == "list_snapshots":
            return {"workspace": name, "snapshots": await ws.snapshots(session.user, name)}
        sb = await session.sandbox()
        if sb.workspace is None:  # pragma: no cover - a workspace session's sandboxes all have it
            return _refused("internal", "the session's sandbox has no workspace directory")
        if r.req.type == "snapshot":
            return {"workspace": name, **await ws.snapshot(session.user, name, sb.workspace, p.get("snapshot"))}
        return {"workspace": name, **await ws.restore(session.user, name, sb.workspace, p["snapshot"])}
    except WorkspaceError as exc:
        return _refused(exc.code, exc.message)


def _refused(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": failure(ERROR_NAMES.get(code, "WorkspaceError"), message)}
