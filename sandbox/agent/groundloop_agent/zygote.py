"""The Python zygote: a process that has imported the worker and the common modules, and forks
fresh workers from itself, so a new context does not wait for an interpreter to start (issue 15).

Run by the agent at its start (``python3 -u -B -P -m groundloop_agent.zygote``), as the sandbox
user, in the agent's own session (the memory guard spares that session, and a context's SIGINT,
sent to the context's own session, never reaches it). It talks to the agent over one
``SOCK_SEQPACKET`` socket, fd ``GROUNDLOOP_ZYGOTE_FD``, one JSON object per message:

- agent -> zygote ``{"fork": n}``: fork n more spares.
- zygote -> agent ``{"spare": pid}`` with the spare's end of a socketpair (SCM_RIGHTS): a child,
  already in a session of its own, that waits on that socket to be claimed.
- zygote -> agent ``{"exit": pid, "status": wait_status}``: a child ended (the zygote reaps them all).
- zygote -> agent ``{"log": text}``: a failure of the zygote's own, for the agent's log.

The agent claims a spare by sending it, on the spare's socket, ``{"cwd":..,"env":..}`` with four
descriptors: stdout, stderr, the command pipe and the answer pipe of the new context. The spare
puts them in place, becomes the worker (pyworker.start and main) and never returns here.

What a fork shares with its zygote and cannot change: the interpreter's start-up settings
(``PYTHON*`` variables such as PYTHONHASHSEED, PYTHONPATH, PYTHONWARNINGS; the agent spawns a
plain worker when a context's env sets one of them differently), and the hash secret: ``str`` and
``bytes`` hashes, and so the iteration order of a set of strings, are the same in every context of
a sandbox (as under a fixed PYTHONHASHSEED). ``random`` is reseeded from the system after the fork.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

MAX_MESSAGE = 1 << 20  # a claim carries the context's env: bounded by what the agent sends
FDS_PER_CLAIM = 4
SPARE_READY_TIMEOUT = 10.0  # seconds: a fork on a machine under heavy load, not a stuck spare


def _send(sock: socket.socket, obj: dict, fds: tuple = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


_PRCTL = None


def _dumpable(on: bool) -> None:
    """The zygote is not dumpable (like the agent): its socket to the agent is not for user code to
    take over through /proc or ptrace. A worker is dumpable again, as a spawned one is."""
    global _PRCTL
    try:
        if _PRCTL is None:
            from .init import PR_SET_DUMPABLE, _prctl

            _PRCTL = (_prctl(), PR_SET_DUMPABLE)
        fn, option = _PRCTL
        fn(option, 1 if on else 0, 0, 0, 0)
    except Exception:
        pass


def before_claim(worker, package_path: str) -> None:
    """In a new spare, before it says it is ready: everything of a worker's start that does not depend on
    the claim, so that a claim (which a context's first run waits for) is only its pipes, cwd and env.
    Measured: a claim took 0.85 ms with all of it after, 0.2 ms with this before."""
    # What the zygote itself needed and a spawned worker does not have.
    if package_path in sys.path:
        sys.path.remove(package_path)
    for name in [n for n in sys.modules if n == "groundloop_agent" or n.startswith("groundloop_agent.")]:
        del sys.modules[name]
    import random

    random.seed()  # the zygote's generator state would otherwise be every context's
    worker.prepare()
    worker.warm()


def become_worker(worker, sock: socket.socket) -> None:
    """In a spare: wait to be claimed, then run as the context's worker until it ends (never returns)."""
    code = 0
    try:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, FDS_PER_CLAIM)
        except InterruptedError:
            os._exit(0)
        if not msg or len(fds) != FDS_PER_CLAIM:
            os._exit(0)  # the agent let the spare go (it is shutting down, or the zygote was replaced)
        sock.close()
        _dumpable(True)
        claim = json.loads(msg)
        out_w, err_w, cmd_r, res_w = fds
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        os.chdir(claim["cwd"])
        os.umask(claim.get("umask", 0o022))
        env = claim["env"]
        if dict(os.environ) != env:  # usually the same: the agent's, which the zygote started with
            os.environ.clear()
            os.environ.update(env)
        worker.start(cmd_r, res_w)
        worker.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


class Zygote:
    def __init__(self, sock: socket.socket, package_path: str):
        from . import pyworker

        self.worker = pyworker
        self.sock = sock
        self.package_path = package_path
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd hears it

    def fork_spare(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()  # the worker's own session and group: interrupts and kills are per context
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 1 << 16)
                before_claim(self.worker, self.package_path)
                theirs.send(b"r")
                become_worker(self.worker, theirs)
            finally:
                os._exit(1)
        theirs.close()
        try:
            # Handed over only once it leads its session: a kill of its group must reach it.
            mine.settimeout(SPARE_READY_TIMEOUT)
            if mine.recv(1) != b"r":
                raise OSError("a spare ended before it was ready")
            _send(self.sock, {"spare": pid}, (mine.fileno(),))
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            mine.close()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            _send(self.sock, {"exit": pid, "status": status})

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 512)
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                data = self.sock.recv(MAX_MESSAGE)
                if not data:
                    return  # the agent is gone, or let us go
                try:
                    n = int(json.loads(data).get("fork", 0))
                    for _ in range(max(0, min(n, 8))):
                        self.fork_spare()
                except Exception as exc:  # a fork that fails (EAGAIN under a pids limit) is reported, not fatal
                    _send(self.sock, {"log": f"zygote: {exc!r}"})


def main() -> None:
    t0 = time.monotonic()
    _dumpable(False)
    sock = socket.socket(fileno=int(os.environ.pop("GROUNDLOOP_ZYGOTE_FD")))
    package_path = os.environ.pop("PYTHONPATH", "")
    zygote = Zygote(sock, package_path)
    zygote.worker.preload()
    import gc

    gc.freeze()  # the preloaded objects stay out of every fork's collections (and their pages shared)
    _send(sock, {"ready": round((time.monotonic() - t0) * 1000, 1), "modules": len(sys.modules)})
    zygote.serve()


if __name__ == "__main__":
    main()
