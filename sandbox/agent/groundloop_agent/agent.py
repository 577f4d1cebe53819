"""The agent: dispatch of requests, the ops, and its main loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from . import egress, languages, memguard
from .common import (
    AGENT_VERSION,
    BASE_ENV,
    ERROR_TEXT_MAX,
    INTERRUPT_GRACE,
    MAX_OUTPUT,
    WORKDIR,
    RequestError,
    shell_argv,
)
from .contexts import Context, Run
from .files import FileOps
from .pipes import READ_CHUNK, Reader, Target, finish_pipes, spawn
from .procs import Cancel, Process, exit_code_of, kill_tree
from .terminals import Terminal, TerminalOps
from .transfer import TransferOps
from .watch import WatchOps
from .wire import READ_MAX, Duplex, In, Out, connect_channel
from .workers import Workers

# --------------------------------------------------------------------------
# The agent.


# A fresh run's context is deleted this long after its done: killing the worker and looking for its
# descendants takes the agent ~1 ms, which a client's next request (sent as soon as the done arrives, as a
# grounded loop does) would otherwise wait behind. Measured (fresh runs of 1 + 1 back to back): p50 5.5 ms with
# the deletion at once, 4.1-4.6 ms with it 20 ms later.
DROP_DELAY = 0.02


class Agent(FileOps, TransferOps, WatchOps, TerminalOps):
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.scratch = memoryview(bytearray(READ_CHUNK))
        self.out: Out = None  # type: ignore[assignment]
        self.pipes: set[Reader] = set()
        self.contexts: dict[str, Context] = {}
        self.processes: dict[str, Process] = {}
        self.terminals: dict[str, Terminal] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancels: dict[str, Cancel] = {}
        self.uploads: dict = {}  # rid of an upload_file -> its Upload (transfer.py)
        self.counter = 0
        self.stopping = asyncio.Event()
        self.workers = Workers(self)

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
            raise RequestError("BadRequest", "path must be a non-empty string")
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
        channel = connect_channel()
        if channel is not None:
            sock, nonce = channel
            _, self.out = await loop.create_unix_connection(lambda: Duplex(self), sock=sock)
            self.out.send({"ev": "channel", "nonce": nonce})  # the server reads this line first
            # out_fd stays open, unused: the attach stream (the lifeline) ends when stdout closes.
        else:
            _, self.out = await loop.connect_write_pipe(lambda: Out(self), os.fdopen(out_fd, "wb", buffering=0))
        langs = languages.available()
        egress_env = egress.start()  # issue 17: the proxy, when the server put an egress socket here
        BASE_ENV.update(egress_env)
        self.out.send(
            {
                "ev": "hello",
                "channel": "socket" if channel is not None else "attach",
                "agent": AGENT_VERSION,
                "pid": os.getpid(),
                "languages": list(langs),
                "python": sys.version.split()[0],
                "workdir": WORKDIR,
                "uid": os.getuid(),
                "egress": bool(egress_env),
            }
        )
        self.workers.start()
        memguard.start(  # gVisor only (issue 21, item 8)
            lambda message: loop.call_soon_threadsafe(
                self.out.send, {"ev": "log", "level": "warning", "message": message}
            )
        )
        # stdin: the requests when there is no socket, and the lifeline either way (its EOF stops the agent).
        transport, _ = await loop.connect_read_pipe(lambda: In(self), sys.stdin.buffer)
        if isinstance(getattr(transport, "max_size", None), int):
            transport.max_size = READ_MAX
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
        target = Target(self, rid=rid, cap=int(req.get("max_output_bytes") or MAX_OUTPUT), frame_max=frame_max_of(req))
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
            done["error"] = {"name": clip(error.name, 256), "message": clip(error.message), "kind": error.kind}
            tb = error.extra.get("traceback")
            if tb:
                done["error"]["traceback"] = clip(tb)
            done.update((k, v) for k, v in error.extra.items() if k != "traceback")
        if target.truncated:
            done["truncated"] = True
        done["agent_ms"] = round((time.monotonic() - t0) * 1000, 3)
        try:
            frame = Out.encode(done)
        except (TypeError, ValueError, RecursionError) as exc:  # not strict JSON: the request still gets a done
            frame = Out.encode(
                {
                    "ev": "done",
                    "rid": rid,
                    "ok": False,
                    "error": {"name": "BadAnswer", "message": f"the answer could not be encoded: {exc}"},
                    "agent_ms": done["agent_ms"],
                }
            )
        if target.frame_max and len(frame) > target.frame_max:
            # The server reads no longer frame (it would lose the sandbox): the answer becomes an error.
            frame = Out.encode(
                {
                    "ev": "done",
                    "rid": rid,
                    "ok": False,
                    "error": {
                        "name": "FrameTooLarge",
                        "message": f"the answer was {len(frame)} bytes, over the limit of {target.frame_max} bytes"
                        + (" (read the file as base64)" if "content" in done else ""),
                    },
                    "agent_ms": done["agent_ms"],
                }
            )
        self.out.send_raw(frame)

    def finish(self, run: Run, extra: dict | None = None, error: RequestError | None = None) -> None:
        if not run.finished:
            run.finished = True
            self.send_done(run.rid, run.target, run.t0, extra, error)
            if run.fresh is not None:  # its context goes with it, a moment later (see DROP_DELAY)
                self.loop.call_later(DROP_DELAY, self.drop_context, run.fresh)

    def drop_context(self, ctx: Context) -> None:
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
        ctx.close(RequestError("ContextNotFound", f"context {ctx.id!r} was deleted"))

    # ---- run_code: no task on the way in or out when the context is warm and idle

    def run_code(self, rid: str, req: dict) -> None:
        t0 = time.monotonic()
        target = Target(self, rid=rid, cap=int(req.get("max_output_bytes") or MAX_OUTPUT), frame_max=frame_max_of(req))
        cancel = self.cancels[rid] = Cancel()
        code = req.get("code")
        if not isinstance(code, str):
            self.send_done(rid, target, t0, None, RequestError("BadRequest", "code must be a string"))
            return
        timeout = req.get("timeout_s")
        run = Run(rid, code, target, cancel, float(timeout) if timeout else None, t0, req.get("env") or None)
        try:
            fresh = bool(req.get("fresh"))
            if fresh and req.get("context") is not None:
                raise RequestError("BadRequest", "fresh takes no context")
            ctx = None if fresh else self.find_context(req)
            language = ctx.language if ctx is not None else req.get("language") or "python"
            refused = languages.refuse(language, code)
            if refused is not None:
                raise refused  # before a context is made for it
            if fresh:  # a context of its own, made now and deleted when the run ends
                cid = self.next_id("fresh-")
                while cid in self.contexts:  # a client may have named one so
                    cid = self.next_id("fresh-")
                ctx = run.fresh = self.make_context(cid, language, None, run.env, ephemeral=True)
            elif ctx is None:  # a default context on its first use: created now, so runs keep their order
                ctx = self.make_context(f"default-{language}", language, None, None)
        except Exception as exc:
            self.finish(run, None, exc if isinstance(exc, RequestError) else RequestError(type(exc).__name__, str(exc)))
            return
        ctx.submit(run)

    async def shutdown(self) -> None:
        self.workers.close()
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
            languages.check(language)
            cid = f"default-{language}"
            if cid not in self.contexts:
                return None
        ctx = self.contexts.get(cid)
        if ctx is None:
            raise RequestError("ContextNotFound", f"no context {cid!r}")
        if req.get("language") and req["language"] != ctx.language:
            raise RequestError("LanguageMismatch", f"context {cid!r} runs {ctx.language}, not {req['language']}")
        return ctx

    def make_context(self, cid, language, cwd, env, session_names=None, ephemeral=False) -> Context:
        """Register a context and start its worker; runs submitted meanwhile wait in its queue.
        ``session_names``: the names of ``env`` that are the session's (set_env), not the request's own;
        ``ephemeral``: a fresh run's context, deleted after its run."""
        languages.check(language)
        ctx = Context(self, cid, language, self.path(cwd) if cwd else WORKDIR, self.env_for(env))
        ctx.ephemeral = ephemeral
        # A run without one of these names (the session dropped it: set_env replace) removes it from the
        # context for good (Context.run_env).
        if isinstance(session_names, list):
            ctx.session_names = frozenset(str(k) for k in session_names if str(k) in ctx.env)
        self.check_cwd(ctx.cwd)
        self.contexts[cid] = ctx
        try:
            ctx.first_start()
        except BaseException:  # out of descriptors for its pipes, say: no half-made context stays behind
            self.drop_context(ctx)
            raise
        return ctx

    async def new_context(self, cid, language, cwd, env, session_names=None) -> Context:
        ctx = self.make_context(cid, language, cwd, env, session_names)
        if ctx.busy is not None:
            await asyncio.wait([ctx.busy])
        if ctx.closed is not None:
            raise ctx.closed
        return ctx

    async def op_create_context(self, req, target, cancel):
        language = req.get("language") or "python"
        languages.check(language)
        cid = req.get("context") or self.next_id("ctx-")
        if cid in self.contexts:
            raise RequestError("ContextExists", f"context {cid!r} exists")
        await self.new_context(cid, language, req.get("cwd"), req.get("env"), req.get("session_names"))
        return {"context_id": cid}

    async def op_delete_context(self, req, target, cancel):
        ctx = self.contexts.pop(req.get("context"), None)
        if ctx is None:
            if req.get("context") in [f"default-{x}" for x in languages.available()]:
                return {}  # a default context not started: listed, and as empty as after a delete
            raise RequestError("ContextNotFound", f"no context {req.get('context')!r}")
        ctx.close(RequestError("ContextNotFound", f"context {ctx.id!r} was deleted"))
        return {}

    async def op_list_contexts(self, req, target, cancel):
        listed = [c.describe() for c in self.contexts.values()]
        # The default contexts are there from the start; a worker starts on first use (or restart).
        for language in languages.available():
            cid = f"default-{language}"
            if cid not in self.contexts:
                listed.append(
                    {"context_id": cid, "language": language, "cwd": WORKDIR, "runs": 0, "restarts": 0, "alive": False}
                )
        return {"contexts": listed}

    async def op_restart_context(self, req, target, cancel):
        cid = req.get("context")
        ctx = self.contexts.get(cid)
        if ctx is None:
            language = cid[len("default-") :] if isinstance(cid, str) and cid.startswith("default-") else None
            if language not in languages.LANGUAGES:
                raise RequestError("ContextNotFound", f"no context {cid!r}")
            await self.new_context(cid, language, None, None)  # a default never used: restarting starts it
            return {"context_id": cid}
        await ctx.reset()
        return {"context_id": cid}

    @staticmethod
    def check_cwd(cwd: str) -> None:
        if not os.path.isdir(cwd):
            raise RequestError("FileNotFoundError", f"no directory {cwd}")
        if not os.access(cwd, os.X_OK):
            # The worker's chdir would fail in the child, which used to end as WorkerDied.
            raise RequestError("PermissionError", f"the sandbox user cannot enter {cwd}")

    def command_of(self, req):
        """The ``command`` and working directory of an exec or start_process request, checked."""
        command = req.get("command")
        if not isinstance(command, str):
            raise RequestError("BadRequest", "command must be a string")
        cwd = self.path(req.get("cwd") or WORKDIR)
        self.check_cwd(cwd)
        return command, cwd

    async def op_exec(self, req, target, cancel):
        command, cwd = self.command_of(req)
        proc, pipes = await spawn(self, shell_argv(command), cwd, self.env_for(req.get("env")), target)
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
        command, cwd = self.command_of(req)
        pid_id = req.get("process_id") or self.next_id("proc-")
        ptarget = Target(self, proc=pid_id, cap=1 << 62)
        proc, pipes = await spawn(self, shell_argv(command), cwd, self.env_for(req.get("env")), ptarget)
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


def frame_max_of(req: dict) -> int:
    try:
        return max(0, int(req.get("max_frame_bytes") or 0))
    except (TypeError, ValueError):
        return 0


def clip(text, limit: int = ERROR_TEXT_MAX) -> str:
    """An error's text within bounds (a cell can raise an exception with a message of any size)."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


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
