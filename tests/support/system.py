"""Facts of this machine a test asks for: this process's memory (now and at its peak), a free loopback port."""

from __future__ import annotations

import socket


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


def rss() -> int:
    """This process's resident memory, in bytes (the in-process server's, in the tests that run one)."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's peak resident memory since start or since ``peak_rss_reset``, in bytes."""
    return _status_bytes("VmHWM")


def peak_rss_reset() -> None:
    """Reset the peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM
        f.write("5")


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a process that binds it itself, so a race is possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
