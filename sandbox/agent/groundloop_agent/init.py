"""Keeping the frame stream the agent's alone: non-dumpable processes, and an init of our own.

The code the agent runs has the agent's uid. A process of the same uid may open
``/proc/<pid>/fd/N`` of another and ptrace it, unless that process is not
dumpable: then both need CAP_SYS_PTRACE, which no sandbox process has. So the
agent makes itself non-dumpable before it reads or writes a frame.

That is not enough under ``docker run --init``: docker-init (pid 1) holds the
container's stdin and stdout, the very pipes of the frame stream, and it is
dumpable, so ``/proc/1/fd/1`` was a way to write frames as the agent. The
container therefore runs without Docker's init, and pid 1 is this module: it
sets itself non-dumpable, lets go of the container's stdin and stdout, forks
the agent (which keeps them), forwards termination signals to it, and reaps
every orphan until the agent ends. A non-dumpable flag survives fork and is
reset by exec, so the agent is protected and the user's programs are not
affected. (pid 1 also ignores signals it has no handler for, even SIGKILL from
inside the container, so the code cannot kill the init either.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def make_undumpable() -> bool:
    """Shut /proc/<pid>/fd, /proc/<pid>/mem and ptrace of this process to its own uid. True if done."""
    try:
        prctl = _prctl()
        if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError) as exc:
        print(f"groundloop agent: could not make itself non-dumpable: {exc}", file=sys.stderr)
        return False


def run_as_init(agent_main) -> None:
    """Be pid 1: fork the agent, reap every process that ends up ours, exit with the agent's status."""
    make_undumpable()  # before the fork: the agent inherits it
    child = os.fork()
    if child == 0:
        code = 1
        try:
            agent_main()
            code = 0
        finally:
            sys.stderr.flush()
            os._exit(code)
    # The agent holds the frame stream; pid 1 lets go of it (stderr stays, for its own last words).
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            # Exiting ends the container; the kernel kills whatever is left in its pid namespace.
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
