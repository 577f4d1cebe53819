"""The session's side of watch_files and the chunked transfers (upload_file/upload_chunk, download_file).

Pure mapping, no I/O: ``prepare`` completes an op's parameters for the agent
(the limits from the settings, the agent's rid of the upload a chunk belongs
to) and says its deadline; ``frames_of`` turns the agent's events of these ops
(already checked field by field in sandbox/framing.py) into client frames.

Long requests: a watch lasts until it is cancelled, and an upload until its
last chunk (the agent drops it after ``upload_idle_s`` without one); neither
gets the server's hung-agent deadline, which would take the sandbox down
under a watch that is simply quiet. Chunks and downloads keep the deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from groundloop.sandbox.settings import SandboxSettings

    from .inflight import RequestTable
    from .protocol import Request

OPS = frozenset({"watch_files", "upload_file", "upload_chunk", "download_file"})


class RequestFailed(Exception):
    """A request refused by the session before it reaches the sandbox (its done: ok false, ``name``)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


def prepare(
    req: Request, params: dict[str, Any], settings: SandboxSettings, requests: RequestTable, deadline: float | None
) -> float | None:
    """Complete ``params`` (the agent's op parameters) of ``req``; its deadline (None: no deadline)."""
    op = req.type
    if op == "watch_files":
        params.setdefault("path", ".")
        params["coalesce_ms"] = settings.watch_coalesce_ms
        params["max_watch_dirs"] = settings.watch_max_dirs
        return None
    if op == "upload_file":
        if params["size"] < 0:
            raise RequestFailed("ValueError", "size must be a non-negative integer")
        params["max_file_bytes"] = settings.max_file_bytes
        params["idle_s"] = settings.upload_idle_s
        return None
    if op == "upload_chunk":
        up = requests.get(params["upload"])
        if up is None or up.req.type != "upload_file" or up.agent_rid is None:
            raise RequestFailed("UploadNotFound", f"no upload_file in flight with id {params['upload']!r}")
        params["upload"] = up.agent_rid
        return deadline
    if op == "download_file":
        params["max_file_bytes"] = settings.max_file_bytes
        params.setdefault("chunk_bytes", settings.transfer_chunk_bytes)
        return deadline
    raise AssertionError(op)


def frames_of(ev: dict[str, Any], rid: Any) -> list[dict[str, Any]]:
    """The client frames of one agent event of these ops (none for an event of another kind)."""
    what = ev.get("ev")
    if what == "fev":
        return [{"type": "file_event", "id": rid, **e} for e in ev["events"]]
    if what == "watching":
        return [{"type": "watching", "id": rid, "path": ev["path"], "watches": ev["watches"]}]
    if what == "progress":
        return [{"type": "progress", "id": rid, "bytes": ev["bytes"], "total": ev["total"]}]
    if what == "chunk":
        return [{"type": "file_chunk", "id": rid, "offset": ev["offset"], "size": ev["size"], "content": ev["content"]}]
    return []
