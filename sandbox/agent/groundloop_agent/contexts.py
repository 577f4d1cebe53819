"""Code contexts: one persistent worker process (Python, JavaScript/TypeScript or bash) each."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING

from . import languages
from .common import INTERRUPT_GRACE, RequestError
from .pipes import Pipe, Target
from .procs import Cancel, exit_code_of, kill_group, kill_group_except, kill_tree
from .workers import ForkedProcess, discard_worker, is_alive, running

if TYPE_CHECKING:
    from .agent import Agent

EXIT_READS = 64  # reads of a worker's answer pipe after its exit (64 KiB each), before its end is taken

# --------------------------------------------------------------------------
# Code contexts: one persistent worker process each.


class Run:
    """One run_code request: queued on a context, begun by a write to its worker,
    finished by the worker's answer (in the reader callback, with no task in between)."""

    __slots__ = ("rid", "code", "target", "cancel", "timeout", "timer", "t0", "finished", "env", "n", "fresh")

    def __init__(
        self,
        rid: str,
        code: str,
        target: Target,
        cancel: Cancel,
        timeout: float | None,
        t0: float,
        env: dict | None = None,
    ):
        self.rid = rid
        self.env = env  # the run's own environment (the session's and the request's), set for this cell only
        self.n = 0  # its execution count, once the worker has it
        self.code = code
        self.target = target
        self.cancel = cancel
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = t0
        self.finished = False
        self.fresh: Context | None = None  # run_code fresh: the context made for this run, deleted after it


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
        self.session_names: frozenset[str] = frozenset()  # names env has from the session's (make_context)
        self.ephemeral = False  # a fresh run's context (run_code fresh)
        self.writes_stop = threading.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.pipes: tuple[Pipe, Pipe] | None = None
        self.ctrl_w: int | None = None
        self.ctrl_r: int | None = None
        self.ctrl_buf = bytearray()
        self.ctrl_eof = False
        self.current: Run | None = None  # the run the worker has
        self.queue: collections.deque[Run] = collections.deque()
        self.busy: asyncio.Future | None = None  # a start, restart, interrupt or burial in progress
        self.resets = 0  # restart_context requests waiting for their turn: the queue waits for them
        self.exit_watch: asyncio.Future | None = None  # the worker's exit (_watch_exit)
        self.swept = False  # the ended worker's group was killed (_exited): once, its pid may be reused after
        self.waiter: asyncio.Future | None = None  # set while an interrupt waits for the worker
        self.closed: RequestError | None = None  # what ended the context, once it has ended
        self.runs = 0
        self.restarts = 0
        self.created = time.time()

    async def start(self) -> None:
        got = await self.agent.workers.obtain(self.language, self.cwd, self.env)
        if self.closed is not None:  # deleted while its worker was on the way
            discard_worker(got)
            raise asyncio.CancelledError
        self._attach(got)

    def start_now(self) -> bool:
        """Take a spare worker at once (no task): True if there was one."""
        got = self.agent.workers.take(self.language, self.cwd, self.env)
        if got is not None:
            self._attach(got)
        return got is not None

    def _attach(self, got) -> None:
        self.proc, self.pipes, self.ctrl_w, self.ctrl_r = got
        self.writes_stop = threading.Event()  # this worker's: set when it is stopped
        # Non-blocking: the acknowledgements of results (notebook.py) must never block the agent, whatever a
        # cell writes on the answer pipe.
        os.set_blocking(self.ctrl_w, False)
        self.ctrl_buf = bytearray()
        self.ctrl_eof = False
        os.set_blocking(self.ctrl_r, False)
        self.agent.loop.add_reader(self.ctrl_r, self._on_ctrl)
        self.swept = False
        # The worker's end is its exit, not only its answer pipe's EOF: a process the cell left behind (a bash
        # ``server &``, or a node child) may hold the pipe open for as long as it lives.
        proc = self.proc
        if isinstance(proc, ForkedProcess):  # the zygote reports its end: a callback, no task on the fast path
            proc.on_end(lambda: self._exited(proc))
        else:
            self.exit_watch = asyncio.ensure_future(self._watch_exit(proc))

    async def _watch_exit(self, proc) -> None:
        await proc.wait()
        self._exited(proc)

    def _exited(self, proc) -> None:
        if proc is not self.proc or self.ctrl_r is None:
            return  # the worker was stopped
        if not self.ctrl_eof:
            # What it answered before it ended goes first (a bounded number of reads: such a child may write on).
            with self.agent.out:
                for _ in range(EXIT_READS):
                    if self.ctrl_eof or not self._read_ctrl():
                        break
                if not self.ctrl_eof:
                    self._ctrl_ended()
        _kill_leftovers(proc)
        self.swept = True

    def alive(self) -> bool:
        return self.proc is not None and running(self.proc) and not self.ctrl_eof

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
        if (
            self.current is not None
            or self.busy is not None
            or self.resets
            or not self.queue
            or self.closed is not None
        ):
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

    def first_start(self) -> None:
        """Start the worker: from a spare at once when there is one, else in a task (``busy``)."""
        if not self.start_now():
            self._busy(self._first_start())

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
        run.n = self.runs
        for p in self.pipes:
            p.target = run.target
        data = languages.cell(self.language, run.code, run.n, self.run_env(run))
        written = 0
        if len(data) < 32768:
            try:
                written = os.write(self.ctrl_w, data)  # fits an idle worker's pipe: all of it, at once
            except BlockingIOError:
                pass  # the pipe holds unread acknowledgements a cell forged: the rest goes below
            except OSError:
                written = len(data)  # the worker is gone: its end of the answer pipe says so
        if written < len(data):
            # The thread writes to its own copy of the descriptor: a restart that closes ctrl_w mid-write
            # cannot hand the number to the next worker's pipe and the cell's tail to that worker. It stops
            # when the worker is stopped (a process the cell started may hold the pipe's other end: no EPIPE).
            try:
                fd = os.dup(self.ctrl_w)
            except OSError:  # out of descriptors: the worker, with part of the cell, is ended (WorkerDied)
                if self.proc is not None:
                    kill_tree(self.proc.pid, signal.SIGKILL)
                return
            fut = self.agent.loop.run_in_executor(None, _write_all, fd, data[written:], self.writes_stop)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        if run.timeout:
            run.timer = self.agent.loop.call_later(run.timeout, self._stop, run, "Timeout")

    def run_env(self, run: Run) -> dict | None:
        """A run's environment: its own (the request's over the session's now), and None for each name this
        context had from the session's environment that the session has dropped since: the worker unsets it
        for good, and a restart no longer starts with it."""
        if not self.session_names:
            return run.env
        dropped = self.session_names.difference(run.env or ())
        if not dropped:
            return run.env
        self.session_names -= dropped
        for name in dropped:
            self.env.pop(name, None)
        return {**dict.fromkeys(dropped), **(run.env or {})}

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

    def _read_ctrl(self) -> bool:
        """Read and act on what the worker answered; False when nothing more is there now (or at its end)."""
        try:
            data = os.read(self.ctrl_r, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._ctrl_ended()
            return False
        # Newlines are looked for in the new bytes only: a long answer (a big result) costs one pass.
        buf = self.ctrl_buf
        start = len(buf)
        buf += data
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            start = 0
            try:
                ev = json.loads(line)
                if not isinstance(ev, dict):
                    raise ValueError("not an object")
            except ValueError:  # the cell's code can write to this pipe: a bad line is its own doing
                continue
            run = self.current
            self._flush_output()  # output written before a result/done goes first
            kind = ev.get("t")
            if kind == "result" or kind == "clear":
                if run is not None and kind == "result":
                    run.target.emit_result(
                        ev.get("data"), ev.get("main", False), ev.get("display_id"), ev.get("update")
                    )
                elif run is not None:
                    run.target.emit_clear(bool(ev.get("wait")))
                if ev.get("ack") and self.ctrl_w is not None:
                    # The worker waits for this before it goes on: what it prints next is read after the result.
                    try:
                        os.write(self.ctrl_w, b"\n")
                    except OSError:  # full (of forged requests' acknowledgements: one is enough) or closed
                        pass
                continue
            result = ev.pop("result", None)
            if result is not None and run is not None:
                run.target.emit_result(result, True)
            if self.waiter is not None:
                self._wake(("done", ev))
            elif run is not None:
                self._end(run)
                extra = self.extra(run)
                code = ev.get("exit_code")
                if isinstance(code, int) and not isinstance(code, bool):  # a bash cell's status
                    extra["exit_code"] = code
                self.agent.finish(run, extra, RequestError.of_answer(ev))
                self._next()
        return True

    def _ctrl_ended(self) -> None:
        """The worker has ended (its answer pipe's EOF, or its exit): wake an interrupt, or bury its run."""
        self.agent.loop.remove_reader(self.ctrl_r)
        self.ctrl_eof = True
        if self.waiter is not None:
            self._wake(("eof", None))
        elif self.current is not None and self.busy is None:
            self._busy(self._bury(self.current))

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
        extra = self.extra(run)
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
        rc = None
        if self.proc is not None:
            waiting = asyncio.ensure_future(self.proc.wait())
            try:
                await asyncio.wait([waiting], timeout=INTERRUPT_GRACE)
                if not waiting.done():  # it closed its answer pipe and lives on: it cannot answer again
                    kill_tree(self.proc.pid, signal.SIGKILL)
                rc = await waiting
            finally:
                waiting.cancel()
        self._end(run)
        how = f"exit code {exit_code_of(rc)}" if rc is not None else "unknown status"
        if rc is not None and rc < 0:
            how = f"signal {signal.Signals(-rc).name}" if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
        try:
            await self.restart()
        finally:
            self.agent.finish(
                run,
                self.extra(run),
                RequestError(
                    "WorkerDied",
                    f"the {self.language} worker died ({how}); the context was restarted and its state was lost",
                    state_lost=True,
                ),
            )

    # ---- life cycle

    def stop(self) -> None:
        self.writes_stop.set()  # a cell's write to this worker, if one is still going (_write_all)
        if self.exit_watch is not None:
            self.exit_watch.cancel()
            self.exit_watch = None
        if self.proc is not None and running(self.proc):
            kill_tree(self.proc.pid, signal.SIGKILL)
        elif self.proc is not None and not self.swept:  # its end was not seen yet (its watch was cancelled)
            _kill_leftovers(self.proc)
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
        if self.ephemeral and not self.queue:
            return  # a fresh run's context, deleted after the run: no worker to start again (_next would)
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
            self.agent.finish(run, self.extra(run), error)

    def extra(self, run: Run) -> dict:
        """The done fields of a run of this context: the context, and its execution count once it began."""
        return {"context": self.id, "execution_count": run.n} if run.n else {"context": self.id}

    async def reset(self) -> None:
        """restart_context: a fresh worker, the state gone. A running cell ends with ``ContextRestarted``;
        queued cells wait and run in the new worker."""
        # Until its restart begins, the queue waits (a queued cell is not begun, then ended by this restart),
        # and so does another restart request: each waits for the one before it, or two would attach workers.
        self.resets += 1
        try:
            while self.busy is not None:
                await asyncio.wait([self.busy])
            if self.closed is not None:
                raise self.closed
            run = self.current
            if run is not None:
                self._flush_output()
                self._end(run)
                self.agent.finish(
                    run, self.extra(run), RequestError("ContextRestarted", "the context was restarted under the run")
                )
            self._busy(self.restart())
        finally:
            self.resets -= 1
            if self.busy is None:  # no restart begun (closed, or this request cancelled): the queue goes on
                self._next()
        restarting = self.busy
        await asyncio.wait([restarting])
        if self.closed is not None:
            raise self.closed
        if restarting.cancelled() or restarting.exception() is not None:
            raise RequestError("WorkerDied", f"the {self.language} worker could not be restarted")

    def describe(self) -> dict:
        return {
            "context_id": self.id,
            "language": self.language,
            "cwd": self.cwd,
            "runs": self.runs,
            "restarts": self.restarts,
            "alive": self.alive(),
        }


def _kill_leftovers(proc) -> None:
    """An ended worker's process group (what its cells started: a bash ``x &``) goes with it. Only while its pid
    is free: a group keeps its number while it has members, so a free pid means the group, if any, is the
    worker's; a pid in use may be a new session leader's."""
    if not is_alive(proc.pid):
        kill_group(proc.pid, signal.SIGKILL)


def _write_all(fd: int, data: bytes, stop: threading.Event) -> None:
    """Write all of data to fd (non-blocking: a full pipe is waited out) until ``stop``, then close fd (a dup:
    ours)."""
    view = memoryview(data)
    try:
        while view and not stop.is_set():
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                stop.wait(0.001)
                continue
            view = view[n:]
    finally:
        os.close(fd)
