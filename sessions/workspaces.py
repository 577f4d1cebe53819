"""Named workspaces as the sessions see them: which are in use, and their operations.

The storage (paths, quota, mounts) is ``groundloop.sandbox.workspaces.WorkspaceStore``; the
tar work is ``groundloop.sandbox.workspace_tools.WorkspaceTools``. This layer adds what
needs the live sessions:

- ``open`` marks (user, name) in use until ``release``: a workspace in use is never
  deleted (``in_use``), by HTTP or otherwise. Several sessions of one user may share a
  workspace (two tabs on one project); they see each other's files.
- one lock per workspace orders snapshot, restore and delete.
- every blocking call runs in a worker thread; one that is cancelled is waited for all
  the same, so the lock is never released while its thread still writes.

Every refusal is a ``WorkspaceError`` with a protocol error code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from groundloop.sandbox.settings import SandboxSettings, parse_size
from groundloop.sandbox.workspaces import WorkspaceError, WorkspaceStore, check_name, new_snapshot_id

T = TypeVar("T")

# error code -> the error name of a request's done
ERROR_NAMES = {
    "bad_request": "BadRequest",
    "not_found": "NotFound",
    "in_use": "InUse",
    "quota_exceeded": "QuotaExceeded",
    "no_workspace": "NoWorkspace",
    "internal": "WorkspaceError",
}


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; a file system error (a root the server may not write, a disk
    error) becomes a WorkspaceError that says so, instead of a server bug."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as exc:
        raise WorkspaceError(f"the workspace store failed: {exc}", "internal") from None


async def _finish_even_if_cancelled(aw: Awaitable[T]) -> T:
    """Await ``aw`` (a worker thread's future); a cancel waits for it to end, then is raised."""
    work = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        try:
            await work
        except Exception:
            pass
        raise


class Workspaces:
    def __init__(self, settings: SandboxSettings, backend: Any):
        self.settings = settings
        self.backend = backend
        self.store: WorkspaceStore | None = None
        if settings.workspace_dir:
            self.store = WorkspaceStore(
                settings.workspace_dir, parse_size(settings.workspace_quota), settings.workspace_quota_mode
            )
        self._tools: Any = None
        self._in_use: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def _need_store(self) -> WorkspaceStore:
        if self.store is None:
            raise WorkspaceError("this server has no named workspaces (GROUNDLOOP_WORKSPACE_DIR is not set)")
        return self.store

    @contextlib.asynccontextmanager
    async def _lock(self, user: str, name: str) -> AsyncIterator[None]:
        """The workspace's lock, forgotten when nobody holds or awaits it (any name a client sends
        would otherwise stay in the table)."""
        key = (user, name)
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    @property
    def tools(self) -> Any:
        if self._tools is None:
            if not getattr(self.backend, "supports_workspaces", False):
                raise WorkspaceError(f"the {self.backend.name} backend has no named workspaces", "internal")
            from groundloop.sandbox.workspace_tools import WorkspaceTools

            labels = {"groundloop.namespace": self.settings.namespace, "groundloop.instance": self.backend.instance}
            self._tools = WorkspaceTools(self.settings, self.backend.client, labels)
        return self._tools

    # ---- sessions

    async def open(self, user: str, name: str) -> str:
        """The host directory of the workspace (made when new), marked in use until ``release``."""
        store = self._need_store()
        if not getattr(self.backend, "supports_workspaces", False):
            raise WorkspaceError(f"the {self.backend.name} backend has no named workspaces")
        check_name(name)
        key = (user, name)
        self._in_use[key] = self._in_use.get(key, 0) + 1  # before the wait: a delete meanwhile is refused
        try:
            async with self._lock(user, name):
                return await _finish_even_if_cancelled(_in_thread(store.open, user, name))
        except BaseException:
            self.release(user, name)
            raise

    def release(self, user: str, name: str) -> None:
        key = (user, name)
        n = self._in_use.get(key, 0) - 1
        if n > 0:
            self._in_use[key] = n
        else:
            self._in_use.pop(key, None)

    def in_use(self, user: str, name: str) -> bool:
        return (user, name) in self._in_use

    # ---- listing and deleting (HTTP)

    async def listing(self, user: str) -> dict[str, Any]:
        store = self._need_store()
        listing = await _in_thread(store.listing, user)
        for ws in listing["workspaces"]:
            ws["in_use"] = self.in_use(user, ws["name"])
        return listing

    async def delete(self, user: str, name: str) -> None:
        store = self._need_store()
        check_name(name)
        async with self._lock(user, name):
            if self.in_use(user, name):
                raise WorkspaceError(f"workspace {name!r} is open in a session", "in_use")
            await _finish_even_if_cancelled(_in_thread(store.delete, user, name))

    async def delete_snapshot(self, user: str, name: str, snapshot: str) -> None:
        store = self._need_store()
        async with self._lock(user, name):
            await _in_thread(store.delete_snapshot, user, check_name(name), snapshot)

    # ---- snapshots (a session's requests)

    async def snapshot(self, user: str, name: str, workspace: str, snapshot: str | None) -> dict[str, Any]:
        store = self._need_store()
        snapshot = check_name(snapshot, "snapshot") if snapshot is not None else new_snapshot_id()
        async with self._lock(user, name):
            if store.mode == "measured":
                await _in_thread(store.check_room, user)
            snapdir = await _in_thread(store.snapshot_dir, user, name)
            await self._tool(self.tools.snapshot(workspace, snapdir, snapshot))
            snaps = {s.id: s for s in await _in_thread(store.snapshots, user, name)}
        made = snaps.get(snapshot)
        return {"snapshot": snapshot, "size": made.size if made else 0}

    async def restore(self, user: str, name: str, workspace: str, snapshot: str) -> dict[str, Any]:
        store = self._need_store()
        check_name(snapshot, "snapshot")
        async with self._lock(user, name):
            if not await _in_thread(store.has_snapshot, user, name, snapshot):
                raise WorkspaceError(f"no snapshot {snapshot!r} of workspace {name!r}", "not_found")
            snapdir = await _in_thread(store.snapshot_dir, user, name)
            await self._tool(self.tools.restore(workspace, snapdir, snapshot))
        return {"snapshot": snapshot}

    async def snapshots(self, user: str, name: str) -> list[dict[str, Any]]:
        store = self._need_store()
        return [s.__dict__ for s in await _in_thread(store.snapshots, user, name)]

    async def _tool(self, aw: Awaitable[None]) -> None:
        from groundloop.sandbox.workspace_tools import ToolFailed

        try:
            await _finish_even_if_cancelled(aw)
        except ToolFailed as exc:
            if exc.out_of_space:
                raise WorkspaceError(f"the user's workspace quota is full: {exc}", "quota_exceeded") from None
            raise WorkspaceError(f"the workspace tool failed: {exc}", "internal") from None

    async def close(self) -> None:
        if self.store is not None:
            await _in_thread(self.store.close)
