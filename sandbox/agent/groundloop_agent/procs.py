"""Processes: killing trees and groups, cancel flags, and the background processes of start_process."""

from __future__ import annotations

import asyncio
import os
import signal
import time


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group_except(pgid: int, keep: int, sig: int = signal.SIGKILL) -> None:
    """Kill every process of group pgid but ``keep`` (forks of a worker left by its code)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit() or int(name) == keep:
            continue
        try:
            if os.getpgid(int(name)) == pgid:
                os.kill(int(name), sig)
        except (ProcessLookupError, PermissionError):
            continue


def descendants(root: int) -> list[int]:
    """Every process whose parent chain reaches root (from /proc)."""
    parent: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            parent[int(name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def kill_tree(pid: int, sig: int) -> None:
    for child in descendants(pid):
        try:
            os.kill(child, sig)
        except (ProcessLookupError, PermissionError):
            pass
    kill_group(pid, sig)


def exit_code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Cancel:
    """A request's cancel flag, with callbacks (cheaper than a task per wait)."""

    __slots__ = ("is_set", "_callbacks")

    def __init__(self):
        self.is_set = False
        self._callbacks: list = []

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            for cb in self._callbacks:
                cb()
            self._callbacks.clear()

    def on(self, cb) -> None:
        if self.is_set:
            cb()
        else:
            self._callbacks.append(cb)

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.on(lambda: fut.done() or fut.set_result(None))
        await fut


# --------------------------------------------------------------------------
# Background processes.


class Process:
    def __init__(self, pid_id: str, command: str, proc, pipes):
        self.id = pid_id
        self.command = command
        self.proc = proc
        self.pipes = pipes
        self.started = time.time()
        self.exit_code: int | None = None

    def describe(self) -> dict:
        return {
            "process_id": self.id,
            "command": self.command,
            "pid": self.proc.pid,
            "running": self.exit_code is None,
            "exit_code": self.exit_code,
            "started_at": self.started,
        }
