"""What every part of the agent shares: limits, the children's environment, request errors."""

from __future__ import annotations

import errno
import os

AGENT_VERSION = 1
WORKDIR = os.environ.get("GROUNDLOOP_WORKDIR") or ("/workspace" if os.path.isdir("/workspace") else os.getcwd())
LINE_MAX = 16 * 1024
MAX_OUTPUT = 16 * 1024 * 1024
MAX_FILE = 32 * 1024 * 1024
INTERRUPT_GRACE = 1.0
ERROR_TEXT_MAX = 64 * 1024  # characters of an error's message or traceback
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": os.environ.get("HOME", "/workspace"),
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "MPLBACKEND": "Agg",
    # The root filesystem is read-only and HOME is the user's workspace: caches go to /tmp (a tmpfs).
    "MPLCONFIGDIR": "/tmp/.matplotlib",
    "IPYTHONDIR": "/tmp/.ipython",
    "TERM": "dumb",
}


class RequestError(Exception):
    """An error that ends one request with ``ok: false``."""

    def __init__(self, name: str, message: str, kind: str = "request", **extra):
        super().__init__(message)
        self.name = name
        self.message = message
        self.kind = kind  # "user": raised by the user's code; "request": the request failed (a documented name)
        self.extra = extra

    @classmethod
    def of_answer(cls, ev: dict) -> RequestError | None:
        """The error of a worker's ``done`` answer; None when it is ok."""
        if ev.get("ok"):
            return None
        err = ev.get("error") or {}
        return cls(err.get("name", "Error"), err.get("message", ""), "user", traceback=err.get("traceback"))


def os_error(exc: OSError) -> RequestError:
    name = type(exc).__name__
    if name == "OSError" and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, "OSError")
    return RequestError(name, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


# The user's processes go first when the sandbox runs out of memory (as its workers do): without this, an exec'd
# fork bomb's processes and the agent had the same oom_score_adj (0), and the OOM killer took the agent, the
# largest of them, losing the sandbox. Set by the shell that runs the command, after its exec (a fork of the agent
# is not dumpable, and its /proc files are then root's), so every descendant inherits it.
OOM_FIRST = "echo 1000 2>/dev/null >/proc/self/oom_score_adj; "


def shell_argv(command: str) -> list[str]:
    """How the agent runs a user's shell command (exec, start_process, a terminal's command)."""
    return ["/bin/sh", "-c", OOM_FIRST + command]


def oom_first(argv: list[str]) -> list[str]:
    """``argv`` run through a shell that marks it first for the OOM killer, then becomes it (same pid)."""
    return ["/bin/sh", "-c", OOM_FIRST + 'exec "$0" "$@"', *argv]
