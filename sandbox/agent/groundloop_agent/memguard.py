"""The agent's memory guard, for gVisor sandboxes only (issue 21, item 8).

Under gVisor the host's OOM killer cannot take one guest process: the guest's memory is one file
of the Sentry, the killer picks a ptrace stub that maps it, and the Sentry then kills itself, so
the whole sandbox is lost. The server sets GROUNDLOOP_MEMORY_GUARD_BYTES below the container's
limit (runsc only); a thread of the agent then kills the process session holding the most memory
when the guest's use passes it, so a memory bomb ends like an OOM kill under runc: in its worker.
Stdlib only, like the agent.
"""

from __future__ import annotations

import os
import signal
import threading
import time

MEMORY_GUARD_VAR = "GROUNDLOOP_MEMORY_GUARD_BYTES"
# A memory bomb grows ~800 MiB/s under gVisor (measured): the guard looks again before the headroom
# left could be used at 1 GiB/s, so an idle sandbox is looked at a few times a second (each look
# costs ~1 ms of host CPU under the ptrace platform) and one near its limit every 2 ms.
MEMORY_GUARD_RATE = 1 << 30
MEMORY_GUARD_PERIOD = (0.002, 0.5)
MEMORY_GUARD_REGROWTH = 32 << 20  # after a kill, growth past the lowest use seen since means another bomb


def guest_memory_used() -> int | None:
    """Bytes the sandbox's processes use: MemTotal - MemFree of gVisor's /proc/meminfo."""
    values = {}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"MemTotal", b"MemFree"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(values) != 2:
        return None
    return values[b"MemTotal"] - values[b"MemFree"]


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, session, resident bytes) of every process but zombies."""
    page = os.sysconf("SC_PAGE_SIZE")
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:  # out of descriptors for a moment: nothing seen this time
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X"):
                found.append((int(name), int(fields[3]), int(fields[21]) * page))
        except (OSError, IndexError, ValueError):
            continue
    return found


def kill_session(sid: int, rounds: int = 50) -> int:
    """SIGKILL every process of session sid, again while a fork bomb still adds some."""
    killed: set[int] = set()
    for _ in range(rounds):
        victims = [pid for pid, s, _ in live_processes() if s == sid and pid not in killed]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                continue
    return len(killed)


def memory_guard(limit: int, report) -> None:
    spare = {os.getsid(0), 0}
    try:
        spare.add(os.getsid(1))
    except OSError:
        pass
    failures = 0
    while True:
        used = guest_memory_used()
        if used is None:  # a failed read (out of descriptors, for a moment) must not end the guard for good
            failures = min(failures + 1, 8)
            time.sleep(min(MEMORY_GUARD_PERIOD[1], MEMORY_GUARD_PERIOD[0] * 2**failures))
            continue
        failures = 0
        if used > limit:
            sessions: dict[int, int] = {}
            for _, sid, rss in live_processes():
                if sid not in spare:
                    sessions[sid] = sessions.get(sid, 0) + rss
            if sessions:
                sid = max(sessions, key=sessions.get)
                n = kill_session(sid)
                report(
                    f"memory guard: {used >> 20} MiB in use, past {limit >> 20} MiB: killed session {sid} "
                    f"({n} processes, {sessions[sid] >> 20} MiB resident)"
                )
                # The Sentry frees a dead process's memory later (seconds, under load): wait for
                # that rather than take another, innocent, session, unless the use grows again.
                # Each look costs CPU: from 10 ms up to the idle period, so memory that is never freed (a
                # tmpfs file counts as guest memory) does not keep the guard spinning.
                floor, delay = used, 0.01
                while True:
                    time.sleep(delay)
                    delay = min(MEMORY_GUARD_PERIOD[1], delay * 1.5)
                    again = guest_memory_used()
                    if again is None or again <= limit or again > floor + MEMORY_GUARD_REGROWTH:
                        break
                    floor = min(floor, again)
                continue
            time.sleep(MEMORY_GUARD_PERIOD[1])  # nothing to kill: look again at the idle pace, not in a spin
            continue
        low, high = MEMORY_GUARD_PERIOD
        time.sleep(min(high, max(low, (limit - used) / MEMORY_GUARD_RATE)))


def start(report) -> bool:
    """Start the guard thread when the server asked for one; ``report(message)`` must be thread-safe."""
    raw = os.environ.get(MEMORY_GUARD_VAR)
    if not raw:
        return False
    threading.Thread(target=memory_guard, args=(int(raw), report), name="memory-guard", daemon=True).start()
    return True
