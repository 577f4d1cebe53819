"""Facts of this machine a test asks for: this process's memory, a free loopback port."""

from __future__ import annotations

import socket


def rss() -> int:
    """This process's resident memory, in bytes (the in-process server's, in the tests that run one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a process that binds it itself, so a race is possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
