"""watch_files in the agent without Docker (the local backend: the agent as a local subprocess, its
workspace a directory of this machine), driven through the server's own Sandbox reader.

What the WebSocket tests cannot arrange: a consumer that stops reading while the tree changes
faster than anything can be buffered, so that the kernel's own queue overflows. The agent must
stop reading inotify while it cannot send (bounded memory), and say ``overflow`` (never lose
events silently), then go on watching.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from groundloop.sandbox.local_backend import LocalBackend
from groundloop.sandbox.settings import SandboxSettings


def max_queued() -> int:
    try:
        with open("/proc/sys/fs/inotify/max_queued_events") as f:
            return int(f.read())
    except OSError:
        return 16384


@pytest.fixture
async def sb():
    backend = LocalBackend(SandboxSettings(backend="local"))
    sandbox = await backend.start("test-agent-watch")
    yield sandbox
    await sandbox.close()
    await backend.close()


class Events:
    """The watch's events; ``gate`` cleared holds the sandbox reader (and so the agent) in its callback."""

    def __init__(self) -> None:
        self.watching = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.events: list[dict] = []
        self.changed = asyncio.Event()

    async def __call__(self, ev: dict) -> None:
        if ev["ev"] == "watching":
            self.watching.set()
            return
        await self.gate.wait()
        self.events.extend(ev["events"])
        self.changed.set()

    async def until(self, pred) -> None:
        while not any(pred(e) for e in self.events):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 60)


async def test_a_reader_that_stops_gets_an_overflow_and_the_watch_goes_on(sb):
    top = os.path.join(sb.hello["workdir"], "flood")
    os.mkdir(top)
    ev = Events()
    fut = sb.submit("watch_files", {"path": top, "coalesce_ms": 50}, ev, rid="w1")
    await asyncio.wait_for(ev.watching.wait(), 60)
    ev.gate.clear()  # the first frame of events holds the reader, and so the agent's stdout fills
    # More events than the agent's stdout buffer (about 1 MiB of frames) and the kernel's queue can hold.
    n = max_queued() * 3 + 40000

    def flood() -> None:
        for i in range(n):
            with open(os.path.join(top, f"f{i}"), "w"):
                pass

    await asyncio.to_thread(flood)
    ev.gate.set()
    await ev.until(lambda e: e["kind"] == "overflow")
    overflow = next(e for e in ev.events if e["kind"] == "overflow")
    assert "overflow" in overflow["message"] and overflow["path"] == top
    created = sum(1 for e in ev.events if e["kind"] == "created")
    assert created < n + 1  # some were lost, and that was said
    # The watch still works afterwards.
    with open(os.path.join(top, "after"), "w"):
        pass
    await ev.until(lambda e: e["path"] == os.path.join(top, "after"))
    sb.cancel("w1")
    done = await asyncio.wait_for(fut, 60)
    assert not done["ok"] and done["error"]["name"] == "Cancelled"


async def test_a_recursive_watch_over_its_directory_limit_says_overflow(sb):
    top = os.path.join(sb.hello["workdir"], "tree")
    for d in ("a", "b", "c", "a/x"):
        os.makedirs(os.path.join(top, d))
    ev = Events()
    fut = sb.submit("watch_files", {"path": top, "recursive": True, "max_watch_dirs": 3}, ev, rid="w2")
    await ev.until(lambda e: e["kind"] == "overflow")
    assert "over 3 directories" in next(e for e in ev.events if e["kind"] == "overflow")["message"]
    sb.cancel("w2")
    assert (await asyncio.wait_for(fut, 60))["error"]["name"] == "Cancelled"
