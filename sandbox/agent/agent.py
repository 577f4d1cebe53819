#!/usr/bin/env python3
"""groundloop in-container agent.

One stdlib-only process per sandbox, the container's main process (under
docker's init). It speaks newline-delimited JSON over its stdin/stdout, which
are the container's attached streams, and runs many requests at once, each
tagged by the server-chosen request id ``rid``.

Server -> agent: ``{"op": ..., "rid": ..., ...}``.
Agent -> server (``ev``):

- ``hello``   once at start: ``{"ev":"hello","agent":1,"pid":..,"languages":[..]}``
- ``out``     output lines of a request: ``{"ev":"out","rid":..,"s":"stdout","lines":[..]}``
- ``result``  a MIME bundle of a run: ``{"ev":"result","rid":..,"data":{..},"main":bool}``
- ``done``    exactly one per request: ``{"ev":"done","rid":..,"ok":bool,...}``
- ``pout``    output of a background process: ``{"ev":"pout","proc":..,"s":..,"lines":[..]}``
- ``pexit``   a background process ended: ``{"ev":"pexit","proc":..,"exit_code":..}``
- ``log``     a diagnostic that belongs to no request.

Output is read from pipes as the children write it (no polling, no per-cell
buffering), split into lines, decoded as UTF-8 with replacement, long lines
split at ``line_max`` bytes, and dropped past a per-request byte cap with a
``truncated`` mark on the ``done`` event.  When the server stops reading, the
agent stops reading the children's pipes, so a flooding child blocks instead
of filling memory.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import collections
import json
import os
import re
import select
import shutil
import signal
import stat
import sys
import time

import memguard  # beside this file (the image copies both to /opt/groundloop)

AGENT_VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIR = os.environ.get("GROUNDLOOP_WORKDIR") or ("/workspace" if os.path.isdir("/workspace") else os.getcwd())
LINE_MAX = 16 * 1024
MAX_OUTPUT = 16 * 1024 * 1024
MAX_FILE = 32 * 1024 * 1024
INTERRUPT_GRACE = 1.0
READ_CHUNK = 256 * 1024
WRITE_BATCH = 256 * 1024
LINES = re.compile(r"[^\n]*\n")
JSON_SPECIAL = bytes(c for c in range(0x20) if c != 0x0A) + b'"\\'  # bytes JSON must escape, but newline
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": os.environ.get("HOME", "/workspace"),
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "MPLBACKEND": "Agg",
    "TERM": "dumb",
}


class RequestError(Exception):
    """An error that ends one request with ``ok: false``."""

    def __init__(self, name: str, message: str, **extra):
        super().__init__(message)
        self.name = name
        self.message = message
        self.extra = extra

    @classmethod
    def of_answer(cls, ev: dict) -> RequestError | None:
        """The error of a worker's ``done`` answer; None when it is ok."""
        if ev.get("ok"):
            return None
        err = ev.get("error") or {}
        return cls(err.get("name", "Error"), err.get("message", ""), traceback=err.get("traceback"))


# --------------------------------------------------------------------------
# Writing frames, with flow control towards the server.


class Out(asyncio.Protocol):
    """Write side of the agent's stdout. Pauses every output pipe when full.

    Frames sent by one callback inside ``with out:`` leave in one write
    (a run's result and its done, the lines of one read): every write costs a
    wake-up of Docker's copiers, so fewer writes means less CPU per request.
    """

    def __init__(self, agent: Agent):
        self.agent = agent
        self.transport: asyncio.WriteTransport | None = None
        self.paused = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.corked = 0

    def connection_made(self, transport):
        self.transport = transport
        # Pause above 1 MiB so a flooding child is stopped early.
        transport.set_write_buffer_limits(high=1 << 20, low=1 << 18)

    def pause_writing(self):
        self.paused = True
        self.agent.pause_pipes()

    def resume_writing(self):
        self.paused = False
        self.agent.resume_pipes()

    def connection_lost(self, exc):
        self.agent.stdout_lost()

    @staticmethod
    def encode(obj: dict) -> bytes:
        """One frame: compact JSON and its newline."""
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace") + b"\n"

    def send(self, obj: dict) -> None:
        self.send_raw(self.encode(obj))

    def send_raw(self, data: bytes) -> None:
        """Send one frame already encoded (a JSON object and its newline)."""
        self.pending.append(data)
        self.pending_bytes += len(data)
        if not self.corked or self.pending_bytes >= WRITE_BATCH:
            self.flush()

    def __enter__(self) -> Out:
        """Hold frames until the block ends (callbacks that may send several)."""
        self.corked += 1
        return self

    def __exit__(self, *exc) -> None:
        self.corked -= 1
        if not self.corked:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class In(asyncio.Protocol):
    """Read side of the agent's stdin: every complete line is handed to the agent at once."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        with self.agent.out:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        buf = self.buf
        if not buf and data.endswith(b"\n") and data.count(b"\n") == 1:
            self.agent.on_line(data)  # the common case: one whole frame
            return
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self.agent.on_line(bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]

    def eof_received(self):
        self.agent.stopping.set()
        return False

    def connection_lost(self, exc):
        self.agent.stopping.set()


# --------------------------------------------------------------------------
# Reading children's output.


class Target:
    """Where the lines of a pipe go: a request (run, exec) or a process."""

    def __init__(self, agent: Agent, rid: str | None = None, proc: str | None = None, cap: int = MAX_OUTPUT):
        self.agent = agent
        self.rid = rid
        self.proc = proc
        self.cap = cap
        self.sent = 0
        self.truncated = False

    def emit_ascii(self, stream: str, region: bytes) -> bool:
        """Send whole lines given as bytes, when that needs no JSON escaping but their newlines
        (printable ASCII, the bulk of most output) and they fit the cap: the frame is made with
        two byte-string operations instead of a JSON encoder. False: use ``emit``."""
        if self.truncated or self.sent + len(region) > self.cap or not region.isascii():
            return False
        if len(region.translate(None, JSON_SPECIAL)) != len(region):
            return False
        self.sent += len(region)
        head = Out.encode(self.frame(stream, []))[:-3] + b'"'  # the frame up to its first line: ...,"lines":["
        self.agent.out.send_raw(head + region.replace(b"\n", b'\\n","')[:-2] + b"]}\n")
        return True

    def frame(self, stream: str, lines: list[str]) -> dict:
        """The ``out`` (of a request) or ``pout`` (of a process) frame of ``lines``."""
        if self.rid is not None:
            return {"ev": "out", "rid": self.rid, "s": stream, "lines": lines}
        return {"ev": "pout", "proc": self.proc, "s": stream, "lines": lines}

    def emit(self, stream: str, lines: list[str], sizes: list[int] | None = None) -> None:
        """Send lines on; ``sizes`` are their lengths in bytes as read (counted against the cap)."""
        if self.truncated:
            return
        if sizes is None:
            sizes = [len(line.encode("utf-8", "surrogatepass")) for line in lines]
        total = sum(sizes)
        if self.sent + total <= self.cap:
            self.sent += total
            keep = lines
        else:
            keep = []
            for line, n in zip(lines, sizes, strict=True):
                if self.sent + n > self.cap:
                    self.truncated = True
                    break
                self.sent += n
                keep.append(line)
        if keep:
            self.agent.out.send(self.frame(stream, keep))


class Pipe:
    """One output pipe of a child: bytes in, decoded lines out to a target."""

    def __init__(self, agent: Agent, fd: int, stream: str, target: Target | None, line_max: int = LINE_MAX):
        self.agent = agent
        self.fd = fd
        self.stream = stream
        self.target = target
        self.line_max = line_max
        self.buf = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.eof = agent.loop.create_future()
        self.reading = False
        os.set_blocking(fd, False)
        agent.pipes.add(self)
        if not agent.out.paused:
            self.start()

    def start(self) -> None:
        if not self.reading and not self.eof.done():
            self.agent.loop.add_reader(self.fd, self.on_readable)
            self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.agent.loop.remove_reader(self.fd)
            self.reading = False

    def on_readable(self) -> None:
        with self.agent.out:
            self.read_some()

    def read_some(self) -> bool:
        """Read what is there (up to READ_CHUNK bytes). Return False at EOF/empty."""
        scratch = self.agent.scratch
        try:
            n = os.readv(self.fd, [scratch])  # into a buffer kept for it: no allocation per read
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if not n:
            self.close()
            return False
        self.feed(scratch[:n])
        return True

    def drain(self) -> None:
        """Synchronously read everything already written to the pipe."""
        while not self.eof.done() and self.read_some():
            pass

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        line_max = self.line_max
        cuts: list[int] = []  # where each piece ends: after a newline, or line_max bytes into a long line
        start = 0
        split_long = False
        while True:
            nl = buf.find(b"\n", start)
            end = len(buf) if nl < 0 else nl + 1
            if end - start > line_max:
                end = start + line_max
                split_long = True
            elif nl < 0:
                break
            cuts.append(end)
            start = end
        if not cuts:
            return
        if split_long:
            # Piece by piece: the decoder carries a character cut at line_max to the next piece.
            lines, sizes, prev = [], [], 0
            for end in cuts:
                text = self.decoder.decode(bytes(buf[prev:end]))
                if text:
                    lines.append(text)
                    sizes.append(end - prev)
                prev = end
        else:
            # Whole lines only (the common case): one decode and one split, or neither for plain ASCII.
            with memoryview(buf) as view:
                region = bytes(view[:start])
            del buf[:start]
            target = self.target
            if target is None:
                return
            if not self.decoder.getstate()[0] and target.emit_ascii(self.stream, region):
                return
            lines = LINES.findall(self.decoder.decode(region))
            sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
            target.emit(self.stream, lines, sizes)
            return
        del buf[:start]
        if lines and self.target is not None:
            self.target.emit(self.stream, lines, sizes)

    def flush_partial(self) -> None:
        """Send what is left without a newline (the end of a run, or of the pipe)."""
        if self.buf:
            size = len(self.buf)
            text = self.decoder.decode(bytes(self.buf), final=True)
            self.buf.clear()
            self.decoder.reset()
            if text and self.target is not None:
                self.target.emit(self.stream, [text], [size])

    def close(self) -> None:
        self.stop()
        self.flush_partial()
        self.agent.pipes.discard(self)
        try:
            os.close(self.fd)
        except OSError:
            pass
        if not self.eof.done():
            self.eof.set_result(None)


async def spawn(
    agent: Agent,
    argv: list[str],
    cwd: str,
    env: dict,
    target: Target | None,
    extra_fds: tuple = (),
    line_max: int = LINE_MAX,
):
    """Start a child in its own session with stdout and stderr on pipes."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=extra_fds,
            close_fds=True,
        )
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w):
            try:
                os.close(fd)
            except OSError:
                pass
    pipes = (Pipe(agent, out_r, "stdout", target, line_max), Pipe(agent, err_r, "stderr", target, line_max))
    return proc, pipes


async def finish_pipes(pipes) -> None:
    """After a child exited: read what its pipes still hold, then close them.

    The pipes end when their last writer closes; a grandchild left in the
    background must not hold the request open, so the wait is short.
    """
    await asyncio.wait([p.eof for p in pipes], timeout=0.2)
    for p in pipes:
        p.drain()
        p.close()


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
# Code contexts: one persistent worker process each.


class Run:
    """One run_code request: queued on a context, begun by a write to its worker,
    finished by the worker's answer (in the reader callback, with no task in between)."""

    __slots__ = ("rid", "code", "target", "cancel", "timeout", "timer", "t0", "finished")

    def __init__(self, rid: str, code: str, target: Target, cancel: Cancel, timeout: float | None, t0: float):
        self.rid = rid
        self.code = code
        self.target = target
        self.cancel = cancel
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = t0
        self.finished = False


class Context:
    """A persistent interpreter (Python or JavaScript) in a worker process.

    Runs are queued and go to the worker one at a time. The common path has no
    task: ``submit`` writes the cell to an idle worker, ``_on_ctrl`` reads its
    answer and sends ``done``. Starting, restarting, interrupting and burying a
    worker are tasks (``self.busy``); the queue waits for them.
    """

    def __init__(self, agent: Agent, cid: str, language: str, cwd: str, env: dict):
        self.agent = agent
        self.id = cid
        self.language = language
        self.cwd = cwd
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.pipes: tuple[Pipe, Pipe] | None = None
        self.ctrl_w: int | None = None
        self.ctrl_r: int | None = None
        self.ctrl_buf = b""
        self.ctrl_eof = False
        self.current: Run | None = None  # the run the worker has
        self.queue: collections.deque[Run] = collections.deque()
        self.busy: asyncio.Future | None = None  # a start, restart, interrupt or burial in progress
        self.waiter: asyncio.Future | None = None  # set while an interrupt waits for the worker
        self.closed: RequestError | None = None  # what ended the context, once it has ended
        self.runs = 0
        self.restarts = 0
        self.created = time.time()

    async def start(self) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(self.env)
        env["GROUNDLOOP_CMD_FD"] = str(cmd_r)
        env["GROUNDLOOP_RES_FD"] = str(res_w)
        if self.language == "python":
            argv = [sys.executable, "-u", os.path.join(HERE, "pyworker.py")]
        else:
            argv = ["node", os.path.join(HERE, "jsworker.js")]
        try:
            self.proc, self.pipes = await spawn(self.agent, argv, self.cwd, env, None, extra_fds=(cmd_r, res_w))
        except BaseException:
            os.close(cmd_w)
            os.close(res_r)
            raise
        finally:
            os.close(cmd_r)
            os.close(res_w)
        self.ctrl_w = cmd_w
        self.ctrl_r = res_r
        self.ctrl_buf = b""
        self.ctrl_eof = False
        os.set_blocking(res_r, False)
        self.agent.loop.add_reader(res_r, self._on_ctrl)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.ctrl_eof

    # ---- the queue

    def submit(self, run: Run) -> None:
        if self.closed is not None:
            self.agent.finish(run, error=self.closed)
            return
        self.queue.append(run)
        run.cancel.on(lambda: self._stop(run, "Cancelled"))
        self._next()

    def _next(self) -> None:
        """Give the worker its next run, when it is idle; (re)start a dead worker first."""
        if self.current is not None or self.busy is not None or not self.queue or self.closed is not None:
            return
        if not self.alive():
            self._busy(self._restart_for_queue())
            return
        self._begin(self.queue.popleft())

    def _busy(self, coro) -> None:
        self.busy = asyncio.ensure_future(coro)

        def idle(task):
            if self.busy is task:
                self.busy = None
            if not task.cancelled() and task.exception() is not None:
                self.agent.out.send(
                    {"ev": "log", "level": "error", "message": f"context {self.id}: {task.exception()!r}"}
                )
            self._next()

        self.busy.add_done_callback(idle)

    async def _first_start(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            if self.agent.contexts.get(self.id) is self:
                del self.agent.contexts[self.id]
            self.close(RequestError("WorkerDied", f"the {self.language} worker could not start: {exc}"))

    async def _restart_for_queue(self) -> None:
        try:
            await self.restart()
        except Exception as exc:
            while self.queue:
                self.agent.finish(
                    self.queue.popleft(),
                    error=RequestError(
                        "WorkerDied", f"the {self.language} worker could not be restarted: {exc}", state_lost=True
                    ),
                )

    def _begin(self, run: Run) -> None:
        self.current = run
        self.runs += 1
        for p in self.pipes:
            p.target = run.target
        data = json.dumps({"code": run.code, "n": self.runs}).encode() + b"\n"
        if len(data) < 32768:
            try:
                os.write(self.ctrl_w, data)  # fits the pipe buffer: never blocks
            except OSError:
                pass  # the worker is gone: its end of the answer pipe says so
        else:
            fut = self.agent.loop.run_in_executor(None, _write_all, self.ctrl_w, data)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        if run.timeout:
            run.timer = self.agent.loop.call_later(run.timeout, self._stop, run, "Timeout")

    def _end(self, run: Run) -> None:
        """The worker is done with ``run``: its output so far goes before its done."""
        if run.timer is not None:
            run.timer.cancel()
        for p in self.pipes or ():
            p.flush_partial()
            p.target = None
        if self.current is run:
            self.current = None

    def _stop(self, run: Run, reason: str) -> None:
        """A timeout or a cancel: drop a queued run, interrupt a running one."""
        if run.finished:
            return
        if run is not self.current:
            try:
                self.queue.remove(run)
            except ValueError:
                return
            self.agent.finish(run, error=RequestError(reason, "the request was cancelled before it started"))
            return
        if self.busy is None:
            self._busy(self._interrupt(run, reason))

    # ---- the worker's answers

    def _on_ctrl(self) -> None:
        """Results are sent on at once; done finishes the run (or wakes an interrupt)."""
        with self.agent.out:
            self._read_ctrl()

    def _read_ctrl(self) -> None:
        try:
            data = os.read(self.ctrl_r, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.agent.loop.remove_reader(self.ctrl_r)
            self.ctrl_eof = True
            if self.waiter is not None:
                self._wake(("eof", None))
            elif self.current is not None and self.busy is None:
                self._busy(self._bury(self.current))
            return
        self.ctrl_buf += data
        while b"\n" in self.ctrl_buf:
            line, self.ctrl_buf = self.ctrl_buf.split(b"\n", 1)
            ev = json.loads(line)
            run = self.current
            self._flush_output()  # output written before a result/done goes first
            if ev.get("t") == "result":
                if run is not None:
                    self.agent.out.send(
                        {"ev": "result", "rid": run.rid, "data": ev["data"], "main": ev.get("main", False)}
                    )
                continue
            result = ev.pop("result", None)
            if result is not None and run is not None:
                self.agent.out.send({"ev": "result", "rid": run.rid, "data": result, "main": True})
            if self.waiter is not None:
                self._wake(("done", ev))
            elif run is not None:
                self._end(run)
                self.agent.finish(run, {"context": self.id}, RequestError.of_answer(ev))
                self._next()

    def _wake(self, value) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(value)

    def _flush_output(self) -> None:
        """Read what the worker wrote before its answer (one poll, no read when nothing is there)."""
        if not self.pipes:
            return
        poller = select.poll()
        for p in self.pipes:
            if not p.eof.done():
                poller.register(p.fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(0)}
        for p in self.pipes:
            if p.fd in ready:
                p.drain()

    # ---- the slow paths (tasks)

    async def _interrupt(self, run: Run, reason: str) -> None:
        """SIGINT the worker's process group; kill and restart it if it does not stop."""
        loop = self.agent.loop
        timeout = run.timeout
        if reason == "Timeout":
            message = f"execution exceeded the timeout of {timeout:g} s"
        else:
            message = "the request was cancelled"
        extra = {"context": self.id}
        self.waiter = loop.create_future()
        kill_group(self.proc.pid, signal.SIGINT)
        timer = loop.call_later(INTERRUPT_GRACE, self._wake, ("stop", None))
        try:
            kind, value = await self.waiter
        finally:
            timer.cancel()
            self.waiter = None
        if kind == "done":
            # The worker answered the SIGINT (KeyboardInterrupt, or it finished): state kept.
            # Whatever else runs in its group (children, or forks of the worker itself
            # that would answer on its pipes) was part of the interrupted run.
            kill_group_except(self.proc.pid, self.proc.pid)
            self._end(run)
            error = RequestError.of_answer(value)
            if error is not None and error.name != "KeyboardInterrupt":
                self.agent.finish(run, extra, error)
            else:
                self.agent.finish(
                    run,
                    extra,
                    RequestError(reason, message + " (interrupted; the context's state is kept)", state_lost=False),
                )
            return
        self._flush_output()
        self._end(run)
        try:
            await self.restart()
        finally:
            self.agent.finish(
                run,
                extra,
                RequestError(
                    reason,
                    message + "; the worker did not stop on SIGINT and was killed: "
                    "the context was restarted and its state was lost",
                    state_lost=True,
                ),
            )

    async def _bury(self, run: Run) -> None:
        """The worker died under ``run``: say how, and restart it."""
        self._flush_output()
        rc = await self.proc.wait() if self.proc else None
        self._end(run)
        how = f"exit code {exit_code_of(rc)}" if rc is not None else "unknown status"
        if rc is not None and rc < 0:
            how = f"signal {signal.Signals(-rc).name}" if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
        try:
            await self.restart()
        finally:
            self.agent.finish(
                run,
                {"context": self.id},
                RequestError(
                    "WorkerDied",
                    f"the {self.language} worker died ({how}); the context was restarted and its state was lost",
                    state_lost=True,
                ),
            )

    # ---- life cycle

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            kill_tree(self.proc.pid, signal.SIGKILL)
        for attr in ("ctrl_w", "ctrl_r"):
            fd = getattr(self, attr)
            if fd is not None:
                if attr == "ctrl_r":
                    self.agent.loop.remove_reader(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, attr, None)
        for p in self.pipes or ():
            p.close()
        self.pipes = None
        self.proc = None

    async def restart(self) -> None:
        self.stop()
        self.restarts += 1
        await self.start()

    def close(self, error: RequestError) -> None:
        """Delete the context: kill its worker and end every run it holds with ``error``."""
        self.closed = error
        if self.busy is not None and self.busy is not asyncio.current_task():
            self.busy.cancel()
        runs = ([self.current] if self.current is not None else []) + list(self.queue)
        self.queue.clear()
        if self.current is not None:
            self._end(self.current)
        self.stop()
        for run in runs:
            self.agent.finish(run, {"context": self.id}, error)

    def describe(self) -> dict:
        return {
            "context_id": self.id,
            "language": self.language,
            "cwd": self.cwd,
            "runs": self.runs,
            "restarts": self.restarts,
            "alive": self.alive(),
        }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        view = view[n:]


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


# --------------------------------------------------------------------------
# The agent.


class Agent:
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.scratch = memoryview(bytearray(READ_CHUNK))
        self.out: Out = None  # type: ignore[assignment]
        self.pipes: set[Pipe] = set()
        self.contexts: dict[str, Context] = {}
        self.processes: dict[str, Process] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancels: dict[str, Cancel] = {}
        self.counter = 0
        self.stopping = asyncio.Event()

    # flow control
    def pause_pipes(self) -> None:
        for p in list(self.pipes):
            p.stop()

    def resume_pipes(self) -> None:
        for p in list(self.pipes):
            p.start()

    def stdout_lost(self) -> None:
        self.stopping.set()

    def env_for(self, extra: dict | None) -> dict:
        env = dict(BASE_ENV)
        for k, v in (extra or {}).items():
            env[str(k)] = str(v)
        return env

    def path(self, p) -> str:
        if not isinstance(p, str) or not p:
            raise RequestError("ValueError", "path must be a non-empty string")
        return os.path.normpath(os.path.join(WORKDIR, p))

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # main loop
    async def main(self) -> None:
        loop = self.loop
        out_fd = os.dup(1)
        # Anything printed by accident goes to stderr, never into the frame stream.
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _, self.out = await loop.connect_write_pipe(lambda: Out(self), os.fdopen(out_fd, "wb", buffering=0))
        langs = ["python"] + (["javascript"] if shutil.which("node") else [])
        self.out.send(
            {
                "ev": "hello",
                "agent": AGENT_VERSION,
                "pid": os.getpid(),
                "languages": langs,
                "python": sys.version.split()[0],
                "workdir": WORKDIR,
                "uid": os.getuid(),
            }
        )
        memguard.start(  # gVisor only (issue 21, item 8)
            lambda message: loop.call_soon_threadsafe(
                self.out.send, {"ev": "log", "level": "warning", "message": message}
            )
        )
        transport, _ = await loop.connect_read_pipe(lambda: In(self), sys.stdin.buffer)
        if isinstance(getattr(transport, "max_size", None), int):
            # asyncio reads 256 KiB at a time, which glibc serves with an mmap (three
            # system calls) per read; 64 KiB comes from the heap.
            transport.max_size = 1 << 16
        await self.stopping.wait()
        await self.shutdown()

    def on_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a frame must be a JSON object")
        except ValueError as exc:
            self.out.send({"ev": "log", "level": "error", "message": f"bad frame: {exc}"})
            return
        self.dispatch(req)

    def dispatch(self, req: dict) -> None:
        rid = req.get("rid")
        op = req.get("op")
        if op == "cancel":
            ev = self.cancels.get(req.get("target"))
            if ev is not None:
                ev.set()
            if rid is not None:
                self.out.send({"ev": "done", "rid": rid, "ok": True, "found": ev is not None})
            return
        if not isinstance(rid, str):
            self.out.send({"ev": "log", "level": "error", "message": "request without a string rid"})
            return
        if op == "run_code":
            self.run_code(rid, req)
            return
        handler = getattr(self, "op_" + str(op), None)
        if handler is None:
            self.out.send(
                {"ev": "done", "rid": rid, "ok": False, "error": {"name": "UnknownOp", "message": f"unknown op {op!r}"}}
            )
            return
        self.cancels[rid] = Cancel()
        self.tasks[rid] = asyncio.ensure_future(self.handle(rid, handler, req))

    async def handle(self, rid: str, handler, req: dict) -> None:
        t0 = time.monotonic()
        target = Target(self, rid=rid, cap=int(req.get("max_output_bytes") or MAX_OUTPUT))
        extra, error = None, None
        try:
            extra = await handler(req, target, self.cancels[rid])
        except RequestError as exc:
            error = exc
        except asyncio.CancelledError:
            error = RequestError("Cancelled", "the agent is shutting down")
        except Exception as exc:  # an agent bug must still end the request
            error = RequestError(type(exc).__name__, str(exc))
        finally:
            self.tasks.pop(rid, None)
        self.send_done(rid, target, t0, extra, error)

    def send_done(
        self, rid: str, target: Target, t0: float, extra: dict | None = None, error: RequestError | None = None
    ) -> None:
        """The one ``done`` of request ``rid``."""
        self.cancels.pop(rid, None)
        done: dict = {"ev": "done", "rid": rid, "ok": error is None}
        if extra:
            done.update(extra)
        if error is not None:
            done["error"] = {"name": error.name, "message": error.message}
            tb = error.extra.get("traceback")
            if tb:
                done["error"]["traceback"] = tb
            done.update((k, v) for k, v in error.extra.items() if k != "traceback")
        if target.truncated:
            done["truncated"] = True
        done["agent_ms"] = round((time.monotonic() - t0) * 1000, 3)
        self.out.send(done)

    def finish(self, run: Run, extra: dict | None = None, error: RequestError | None = None) -> None:
        if not run.finished:
            run.finished = True
            self.send_done(run.rid, run.target, run.t0, extra, error)

    # ---- run_code: no task on the way in or out when the context is warm and idle

    def run_code(self, rid: str, req: dict) -> None:
        t0 = time.monotonic()
        target = Target(self, rid=rid, cap=int(req.get("max_output_bytes") or MAX_OUTPUT))
        cancel = self.cancels[rid] = Cancel()
        code = req.get("code")
        if not isinstance(code, str):
            self.send_done(rid, target, t0, None, RequestError("ValueError", "code must be a string"))
            return
        timeout = req.get("timeout_s")
        run = Run(rid, code, target, cancel, float(timeout) if timeout else None, t0)
        try:
            ctx = self.find_context(req)
            if ctx is None:  # a default context on its first use: created now, so runs keep their order
                language = req.get("language") or "python"
                ctx = self.make_context(f"default-{language}", language, None, None)
        except RequestError as exc:
            self.finish(run, None, exc)
            return
        ctx.submit(run)

    async def shutdown(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        for c in list(self.contexts.values()):
            c.close(RequestError("Cancelled", "the agent is shutting down"))
        for p in list(self.processes.values()):
            if p.exit_code is None:
                kill_tree(p.proc.pid, signal.SIGKILL)
        self.out.flush()

    # ---- ops

    async def op_ping(self, req, target, cancel):
        return {"pong": True}

    def find_context(self, req) -> Context | None:
        """The context a request names; None for a default context not created yet."""
        cid = req.get("context")
        language = req.get("language") or "python"
        if cid is None:
            if language not in ("python", "javascript"):
                raise RequestError("ValueError", f"unsupported language {language!r}")
            cid = f"default-{language}"
            if cid not in self.contexts:
                return None
        ctx = self.contexts.get(cid)
        if ctx is None:
            raise RequestError("ContextNotFound", f"no context {cid!r}")
        if req.get("language") and req["language"] != ctx.language:
            raise RequestError("ValueError", f"context {cid!r} runs {ctx.language}, not {req['language']}")
        return ctx

    def make_context(self, cid, language, cwd, env) -> Context:
        """Register a context and start its worker; runs submitted meanwhile wait in its queue."""
        if language == "javascript" and not shutil.which("node"):
            raise RequestError("ValueError", "javascript needs node, which this sandbox does not have")
        ctx = Context(self, cid, language, self.path(cwd) if cwd else WORKDIR, self.env_for(env))
        if not os.path.isdir(ctx.cwd):
            raise RequestError("FileNotFoundError", f"no directory {ctx.cwd}")
        self.contexts[cid] = ctx
        ctx._busy(ctx._first_start())
        return ctx

    async def new_context(self, cid, language, cwd, env) -> Context:
        ctx = self.make_context(cid, language, cwd, env)
        await asyncio.wait([ctx.busy])
        if ctx.closed is not None:
            raise ctx.closed
        return ctx

    async def op_create_context(self, req, target, cancel):
        language = req.get("language") or "python"
        if language not in ("python", "javascript"):
            raise RequestError("ValueError", f"unsupported language {language!r}")
        cid = req.get("context") or self.next_id("ctx-")
        if cid in self.contexts:
            raise RequestError("ValueError", f"context {cid!r} exists")
        await self.new_context(cid, language, req.get("cwd"), req.get("env"))
        return {"context_id": cid}

    async def op_delete_context(self, req, target, cancel):
        ctx = self.contexts.pop(req.get("context"), None)
        if ctx is None:
            raise RequestError("ContextNotFound", f"no context {req.get('context')!r}")
        ctx.close(RequestError("ContextNotFound", f"context {ctx.id!r} was deleted"))
        return {}

    async def op_list_contexts(self, req, target, cancel):
        return {"contexts": [c.describe() for c in self.contexts.values()]}

    async def op_exec(self, req, target, cancel):
        command = req.get("command")
        if not isinstance(command, str):
            raise RequestError("ValueError", "command must be a string")
        cwd = self.path(req.get("cwd") or WORKDIR)
        if not os.path.isdir(cwd):
            raise RequestError("FileNotFoundError", f"no directory {cwd}")
        proc, pipes = await spawn(self, ["/bin/sh", "-c", command], cwd, self.env_for(req.get("env")), target)
        timeout = req.get("timeout_s")
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper}, timeout=timeout or None, return_when=asyncio.FIRST_COMPLETED
            )
            reason = None
            if waiter not in done:
                reason = "Cancelled" if stopper in done else "Timeout"
                kill_tree(proc.pid, signal.SIGINT)
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), INTERRUPT_GRACE)
                except TimeoutError:
                    kill_tree(proc.pid, signal.SIGKILL)
                    await waiter
            await finish_pipes(pipes)
            code = exit_code_of(proc.returncode)
            if reason:
                msg = (
                    f"the command exceeded the timeout of {timeout:g} s"
                    if reason == "Timeout"
                    else "the request was cancelled"
                )
                raise RequestError(reason, msg + " and was stopped", exit_code=code)
            return {"exit_code": code}
        finally:
            stopper.cancel()
            if proc.returncode is None:
                kill_tree(proc.pid, signal.SIGKILL)

    async def op_start_process(self, req, target, cancel):
        command = req.get("command")
        if not isinstance(command, str):
            raise RequestError("ValueError", "command must be a string")
        cwd = self.path(req.get("cwd") or WORKDIR)
        if not os.path.isdir(cwd):
            raise RequestError("FileNotFoundError", f"no directory {cwd}")
        pid_id = req.get("process_id") or self.next_id("proc-")
        ptarget = Target(self, proc=pid_id, cap=1 << 62)
        proc, pipes = await spawn(self, ["/bin/sh", "-c", command], cwd, self.env_for(req.get("env")), ptarget)
        p = Process(pid_id, command, proc, pipes)
        self.processes[pid_id] = p
        asyncio.ensure_future(self.watch_process(p))
        return {"process_id": pid_id, "pid": proc.pid}

    async def watch_process(self, p: Process) -> None:
        rc = await p.proc.wait()
        await finish_pipes(p.pipes)
        p.exit_code = exit_code_of(rc)
        self.out.send({"ev": "pexit", "proc": p.id, "exit_code": p.exit_code})

    async def op_kill_process(self, req, target, cancel):
        p = self.processes.get(req.get("process_id"))
        if p is None:
            raise RequestError("ProcessNotFound", f"no process {req.get('process_id')!r}")
        if p.exit_code is None:
            kill_tree(p.proc.pid, int(req.get("signal") or signal.SIGTERM))
            try:
                await asyncio.wait_for(asyncio.shield(p.proc.wait()), INTERRUPT_GRACE)
            except TimeoutError:
                kill_tree(p.proc.pid, signal.SIGKILL)
                await p.proc.wait()
        return {"process_id": p.id}

    async def op_list_processes(self, req, target, cancel):
        return {"processes": [p.describe() for p in self.processes.values()]}

    # files
    async def op_write_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        content = req.get("content")
        if not isinstance(content, str):
            raise RequestError("ValueError", "content must be a string")
        enc = req.get("encoding") or "utf-8"
        if enc == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise RequestError("ValueError", f"content is not valid base64: {exc}")
        elif enc in ("utf-8", "utf8"):
            data = content.encode("utf-8", "surrogatepass")
        else:
            raise RequestError("ValueError", f"unknown encoding {enc!r} (utf-8 or base64)")
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        if len(data) > cap:
            raise RequestError("FileTooLarge", f"{len(data)} bytes is over the file size limit of {cap} bytes")
        try:
            if req.get("parents", True):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path, "size": len(data)}

    async def op_read_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise RequestError("IsADirectoryError", f"{path} is a directory")
            if st.st_size > cap:
                raise RequestError("FileTooLarge", f"{path} is {st.st_size} bytes, over the limit of {cap} bytes")
            with open(path, "rb") as f:
                data = f.read(cap + 1)
        except OSError as exc:
            raise os_error(exc)
        if len(data) > cap:
            raise RequestError("FileTooLarge", f"{path} is over the limit of {cap} bytes")
        enc = req.get("encoding")
        if enc not in (None, "utf-8", "utf8", "base64"):
            raise RequestError("ValueError", f"unknown encoding {enc!r} (utf-8 or base64)")
        if enc != "base64":
            try:
                return {"content": data.decode("utf-8"), "encoding": "utf-8", "size": len(data)}
            except UnicodeDecodeError:
                if enc:  # asked for text explicitly
                    raise RequestError("UnicodeDecodeError", f"{path} is not valid UTF-8; ask for base64")
        return {"content": base64.b64encode(data).decode(), "encoding": "base64", "size": len(data)}

    async def op_list_files(self, req, target, cancel):
        path = self.path(req.get("path") or ".")
        entries = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    kind = (
                        "symlink"
                        if stat.S_ISLNK(st.st_mode)
                        else "directory"
                        if stat.S_ISDIR(st.st_mode)
                        else "file"
                        if stat.S_ISREG(st.st_mode)
                        else "other"
                    )
                    entries.append({"name": e.name, "type": kind, "size": st.st_size, "mtime": st.st_mtime})
        except OSError as exc:
            raise os_error(exc)
        entries.sort(key=lambda e: e["name"])
        return {"path": path, "entries": entries}

    async def op_delete_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if req.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path}

    async def op_mkdir(self, req, target, cancel):
        path = self.path(req.get("path"))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path}


def os_error(exc: OSError) -> RequestError:
    name = type(exc).__name__
    if name == "OSError" and exc.errno is not None:
        import errno

        name = errno.errorcode.get(exc.errno, "OSError")
    return RequestError(name, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def main() -> None:
    # SIGINT is left alone: children inherit an ignored signal, and workers
    # need SIGINT to raise KeyboardInterrupt. Workers are in their own
    # sessions, so the SIGINTs the agent sends never reach the agent.
    try:
        os.chdir(WORKDIR)
    except OSError:
        pass

    async def run() -> None:
        await Agent().main()

    asyncio.run(run())


if __name__ == "__main__":
    main()
