"""sessions/workspaces.py without Docker: in-use marks, refusals, and a lock table that does not grow
with the names clients send."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from groundloop.sandbox.settings import SandboxSettings, load
from groundloop.sandbox.workspaces import WorkspaceError
from groundloop.sessions.workspaces import Workspaces


class Backend:
    name = "docker"
    supports_workspaces = True
    instance = "test"


def service(tmp_path, **kw) -> Workspaces:
    s = dataclasses.replace(
        load(SandboxSettings, {}), workspace_dir=str(tmp_path), workspace_quota_mode="measured", **kw
    )
    return Workspaces(s, Backend())


async def test_in_use_refuses_delete_until_released(tmp_path):
    ws = service(tmp_path)
    await ws.open("alice", "w")
    await ws.open("alice", "w")  # a second session on the same workspace
    for _ in range(2):
        with pytest.raises(WorkspaceError) as info:
            await ws.delete("alice", "w")
        assert info.value.code == "in_use"
        ws.release("alice", "w")
    await ws.delete("alice", "w")
    assert (await ws.listing("alice"))["workspaces"] == []


async def test_the_lock_table_forgets_every_name(tmp_path):
    ws = service(tmp_path)
    for i in range(50):
        with pytest.raises(WorkspaceError):
            await ws.delete_snapshot("alice", f"w{i}", "s")
    with pytest.raises(WorkspaceError):
        await ws.delete("alice", "nope")
    await asyncio.gather(ws.open("alice", "a"), ws.open("alice", "a"))
    assert ws._locks == {}


async def test_disabled_and_bad_names(tmp_path):
    off = Workspaces(load(SandboxSettings, {}), Backend())
    assert not off.enabled
    with pytest.raises(WorkspaceError) as info:
        await off.open("alice", "w")
    assert "GROUNDLOOP_WORKSPACE_DIR" in info.value.message
    with pytest.raises(WorkspaceError) as info:
        await service(tmp_path).open("alice", "../w")
    assert info.value.code == "bad_request"
    assert not list(tmp_path.iterdir())
