"""The session: one WebSocket to a groundloop server, resumed when it drops.

Tasks: one reader (``_supervise``: reads frames, and on a drop resumes the
session at ``/v1/ws?session=ID&last_seq=N``), and short-lived owned tasks for
resyncs and for cancels sent on behalf of a cancelled caller. Every request's
send waits on one gate, open only while a socket is up and resynced.

Resume, nothing lost and nothing twice:

- Frames are deduplicated by ``seq``; the server replays every frame after
  ``last_seq``.
- A request written to a socket that dropped before any frame of it came back
  is *uncertain*: the server may or may not have read it. After ``ready`` the
  client sends a ``ping`` and waits for its ``done``: the replayed frames come
  before it, so an uncertain request that has seen no frame by then is either
  still running silently (resending it gets a duplicate-id ``error``, no
  ``done``: harmless) or was never read (resending runs it once). Only then are
  the uncertain requests resent, in order, and the gate opened for new ones.
  One window stays open, because the protocol cannot be asked whether it has
  seen an id: a request the server read, that sent no frame before the replay
  was in, and that ends within the one round trip of its resend, runs twice.
- A ``gap`` (frames evicted before the resume) fails every request sent before
  it with ``GapError`` and cancels it on the server: its output or its ``done``
  may be among the lost frames, and a result with silent holes is worse than
  an error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from . import results as R
from .errors import AuthError, ConnectError, GapError, GroundloopError, ProtocolError, RequestError, SessionClosed
from .frames import DoneFrame, Frame, ReadyFrame
from .request import Process, Request, SendState

log = logging.getLogger("groundloop.client")

T = TypeVar("T")
Callback = Callable[[T], Any]  # may return an awaitable: it is awaited in the caller's task

# Close codes after which resuming is pointless: the server said the session is over,
# or refused us, or another connection took it over.
FATAL_CLOSE = {1000, 1008, 1013, 4400, 4401, 4403, 4404, 4409, 4410, 4429}
# A resume answered with one of these error codes will never succeed.
FATAL_CODES = {"not_found", "bad_request", "unauthorized", "forbidden"}


def ws_url(url: str) -> str:
    """``http(s)://host:port`` or ``ws(s)://host:port[/v1/ws]`` → the WebSocket endpoint."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class Session:
    """A live groundloop session. Make one with ``connect()``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        on_event: Callable[[Frame], None] | None = None,
        open_timeout: float = 60.0,
        max_frame_bytes: int = 64 << 20,
        process_buffer_frames: int = 10_000,
        resume: bool = True,
    ):
        self.url = ws_url(url)
        self.ready: ReadyFrame | None = None
        self.session_id: str | None = None
        self.last_seq = 0
        self.resumes = 0  # how many times the session was resumed after a drop
        self.closed: GroundloopError | None = None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._on_event = on_event
        self._open_timeout = open_timeout
        self._max_size = max_frame_bytes
        self._process_buffer = process_buffer_frames
        self._resume_enabled = resume
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._gate = asyncio.Event()
        self._requests: dict[str, Request] = {}
        self._processes: dict[str, Process] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle

    async def open(self) -> Session:
        ws, ready = await self._dial(resume=False)
        self._attach(ws, ready)
        self._gate.set()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"groundloop-client-{self._prefix}")
        return self

    async def close(self) -> None:
        """Close the socket. The server keeps the session for its resume grace, then removes its sandbox."""
        if self.closed is None:
            self._finish(SessionClosed("the session was closed by the client"))
        if self._supervisor is not None:
            self._supervisor.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *([self._supervisor] if self._supervisor else []), return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> Session:
        if self._supervisor is None:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _dial(self, *, resume: bool, timeout: float | None = None) -> tuple[ClientConnection, ReadyFrame]:
        timeout = self._open_timeout if timeout is None else timeout
        url = self.url
        if resume:
            query = urlencode({"session": self.session_id, "last_seq": self.last_seq})
            url = f"{url}{'&' if '?' in url else '?'}{query}"
        try:
            ws = await websockets.connect(
                url,
                additional_headers=self._headers,
                compression=None,
                max_size=self._max_size,
                open_timeout=timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
            cls = AuthError if status in (401, 403) else ConnectError
            raise cls(f"the server refused the connection: HTTP {status} {body}".strip(), status=status) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except (ConnectionClosed, TimeoutError) as exc:
            await ws.close()
            raise ConnectError(f"the server sent no ready frame: {exc}", close_code=ws.close_code) from exc
        if first.get("type") == "error":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.wait_closed(), 5)
            code, message = first.get("code"), first.get("message") or ""
            if resume and code in FATAL_CODES:
                raise SessionClosed(f"the session cannot be resumed: {code}: {message}", code=code)
            raise ConnectError(f"{code}: {message}", code=code, close_code=ws.close_code)
        if first.get("type") != "ready":
            await ws.close()
            raise ProtocolError(f"expected a ready frame, got {first!r}")
        return ws, cast(ReadyFrame, first)

    def _attach(self, ws: ClientConnection, ready: ReadyFrame) -> None:
        self._ws = ws
        self._generation += 1
        self.ready = ready
        self.session_id = ready["session_id"]
        self.last_seq = ready["seq"]

    def _finish(self, exc: GroundloopError) -> None:
        """The session is over: every pending request and process fails with ``exc``."""
        if self.closed is not None:
            return
        self.closed = exc
        self._gate.set()  # wake senders: they find the session closed
        for req in list(self._requests.values()):
            req._fail(exc)
        self._requests.clear()
        for proc in self._processes.values():
            proc._wake.set()

    async def _supervise(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                code, reason = await self._pump(ws)
                self._gate.clear()
                for t in list(self._tasks):
                    if t.get_name().startswith("resync"):
                        t.cancel()
                for req in self._requests.values():
                    if req.state == SendState.SENT:
                        req.state = SendState.UNCERTAIN
                if code in FATAL_CLOSE or not self._resume_enabled:
                    self._finish(
                        SessionClosed(f"the server closed the session ({code} {reason})".strip(), close_code=code)
                    )
                    return
                log.info("groundloop: connection lost (%s %s), resuming session %s", code, reason, self.session_id)
                ws = await self._reconnect()
        except GroundloopError as exc:
            self._finish(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("groundloop client reader failed")
            self._finish(ProtocolError(f"the client's reader failed: {exc!r}"))

    async def _pump(self, ws: ClientConnection) -> tuple[int | None, str]:
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError as exc:
                    raise ProtocolError(f"the server sent a frame that is not JSON: {raw[:200]!r}") from exc
                if isinstance(frame, dict):
                    self._on_frame(frame)
        except ConnectionClosed:
            pass
        code = ws.close_code if ws.close_code is not None else 1006
        return code, ws.close_reason or ""

    async def _reconnect(self) -> ClientConnection:
        assert self.ready is not None
        grace = float(self.ready.get("limits", {}).get("resume_grace_s") or 60.0)
        deadline = time.monotonic() + grace
        delay = 0.05
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                ws, ready = await self._dial(resume=True, timeout=min(self._open_timeout, remaining))
            except (AuthError, SessionClosed, ProtocolError):
                raise
            except ConnectError as exc:
                if exc.code in FATAL_CODES:
                    raise SessionClosed(str(exc), code=exc.code) from exc
                last = exc
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            if ready["seq"] != self.last_seq + 1:
                await ws.close()
                raise ProtocolError(f"resumed with seq {ready['seq']}, expected {self.last_seq + 1}")
            self._attach(ws, ready)
            self.resumes += 1
            self._event(cast(Frame, ready))
            self._own(self._resync(ws), name="resync")
            return ws
        raise SessionClosed(f"the session could not be resumed within {grace:g} s: {last}")

    async def _resync(self, ws: ClientConnection) -> None:
        barrier = self._register("ping", {}, keep_frames=False)
        barrier.state, barrier.generation = SendState.SENT, self._generation
        await ws.send(json.dumps(barrier.frame))
        await barrier.wait()
        for req in sorted(self._requests.values(), key=lambda r: r.generation):
            if req.state == SendState.UNCERTAIN:
                req.state, req.generation, req.resent = SendState.SENT, self._generation, True
                await ws.send(json.dumps(req.frame))
        self._gate.set()

    def _own(self, coro: Awaitable[Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (ConnectionClosed, GroundloopError)):
                log.error("groundloop client task %s failed: %r", task.get_name(), exc)

    # ---- frames in

    def _on_frame(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq") or 0
        if seq:
            if seq <= self.last_seq:
                return  # already processed before a resume
            self.last_seq = seq
        kind = frame.get("type")
        pid = frame.get("process_id")
        if pid is not None and kind in ("stdout", "stderr", "exit"):
            proc = self._processes.get(pid)
            if proc is None:  # started by another client of this session, or before a restart
                proc = self._processes[pid] = Process(self, pid, "", self._process_buffer)
            proc._push(frame)
            return
        rid = frame.get("id")
        if rid is not None:
            req = self._requests.get(str(rid))
            if req is None:
                # a request this client gave up on (cancelled, failed by a gap): nobody waits for it
                log.debug("groundloop: dropped a %s frame of abandoned request %s", kind, rid)
                return
            req._push(frame)
            if kind == "done":
                del self._requests[req.id]
            return
        if kind == "gap":
            self._on_gap(frame)
        elif kind == "sandbox_replaced":
            for proc in self._processes.values():
                if not proc.exited:
                    proc._end(lost=True)
        self._event(cast(Frame, frame))

    def _on_gap(self, frame: dict[str, Any]) -> None:
        exc = GapError(frame)
        log.warning("groundloop: %s", exc)
        for req in list(self._requests.values()):
            if req.generation < self._generation and req.state != SendState.NEW:
                req._fail(exc)
                del self._requests[req.id]
                self._own(self._send_cancel(req.id), name=f"cancel-{req.id}")
        for proc in self._processes.values():
            proc._push(frame)

    def _event(self, frame: Frame) -> None:
        if self._on_event is not None:
            try:
                self._on_event(frame)
            except Exception:
                log.exception("groundloop on_event callback failed")

    # ---- requests out

    def _register(self, type: str, fields: dict[str, Any], *, keep_frames: bool = True) -> Request:
        if self.closed is not None:
            raise self.closed
        rid = f"{self._prefix}-{next(self._ids)}"
        frame = {"type": type, "id": rid, **{k: v for k, v in fields.items() if v is not None}}
        req = Request(self, rid, frame, keep_frames=keep_frames)
        self._requests[rid] = req
        return req

    async def request(self, type: str, /, **fields: Any) -> Request:
        """Send one request (fields as in docs/protocol.md; ``None`` values are left out) and return its handle."""
        req = self._register(type, fields)
        try:
            await self._send(req)
        except BaseException:
            if req.state == SendState.NEW:
                self._requests.pop(req.id, None)
            else:
                self._abandon(req)
            raise
        return req

    async def _send(self, req: Request) -> None:
        while not self._gate.is_set():
            await self._gate.wait()
        if self.closed is not None:
            raise self.closed
        ws = self._ws
        assert ws is not None
        req.state, req.generation = SendState.SENT, self._generation
        try:
            await ws.send(json.dumps(req.frame))
        except ConnectionClosed:
            pass  # the reader marks it uncertain; the resync resends it

    def _abandon(self, req: Request) -> None:
        """The caller stopped waiting for ``req``: cancel it on the server, from a task the session owns."""
        if req.finished or req.abandoned or self.closed is not None:
            return
        req.abandoned = True
        if req.state == SendState.NEW:
            self._requests.pop(req.id, None)
            return
        self._own(self._send_cancel(req.id), name=f"cancel-{req.id}")

    async def _send_cancel(self, target: str) -> None:
        found = await self.cancel(target)
        req = self._requests.get(target)
        if not found and req is not None and req.state == SendState.UNCERTAIN:
            # never reached the server: nothing will ever answer it
            self._requests.pop(target, None)
            req._fail(RequestError("Cancelled", "cancelled before the server received it"))

    async def call(self, type: str, /, **fields: Any) -> dict[str, Any]:
        """Send a request and return its ``done`` (with the fields of its type); raises
        ``RequestError`` when it is ``ok: false``."""
        req = await self.request(type, **fields)
        done = dict(await req.wait())
        if not done.get("ok"):
            raise RequestError.from_done(done)
        return done

    async def _stream(
        self,
        req: Request,
        on_stdout: Callback[str] | None,
        on_stderr: Callback[str] | None,
        on_result: Callback[R.Result] | None = None,
        on_frame: Callback[Frame] | None = None,
    ) -> DoneFrame:
        try:
            return await self._dispatch(req, on_stdout, on_stderr, on_result, on_frame)
        except BaseException:
            # a callback raised, or the caller was cancelled inside one: stop the request too
            self._abandon(req)
            raise

    async def _dispatch(
        self,
        req: Request,
        on_stdout: Callback[str] | None,
        on_stderr: Callback[str] | None,
        on_result: Callback[R.Result] | None,
        on_frame: Callback[Frame] | None,
    ) -> DoneFrame:
        async for frame in req:
            cb: Any = None
            arg: Any = None
            if frame["type"] == "stdout" and on_stdout is not None:
                cb, arg = on_stdout, frame["text"]
            elif frame["type"] == "stderr" and on_stderr is not None:
                cb, arg = on_stderr, frame["text"]
            elif frame["type"] == "result" and on_result is not None:
                cb, arg = on_result, R.Result.of(frame)
            if cb is not None:
                out = cb(arg)
                if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
                    await out
            if on_frame is not None:
                out = on_frame(frame)
                if asyncio.iscoroutine(out):
                    await out
        return await req.wait()

    # ---- the protocol's operations

    async def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: str | None = None,
        timeout_s: float | None = None,
        env: dict[str, str] | None = None,
        fresh: bool = False,
        on_stdout: Callback[str] | None = None,
        on_stderr: Callback[str] | None = None,
        on_result: Callback[R.Result] | None = None,
    ) -> R.Execution:
        """Run ``code`` in a context (the session's default one of ``language`` unless ``context`` is given).

        ``env``: environment variables for this run only. ``fresh``: in a new, clean context of its own,
        deleted when the run ends (what a grounded loop checks each attempt in; one request instead of
        create_context, run_code and delete_context). The callbacks get each line (and each rich result) as it
        arrives; they may be coroutine functions. The code's own failure is in ``Execution.error``.
        """
        req = await self.request(
            "run_code",
            code=code,
            language=language,
            context=context,
            timeout_s=timeout_s,
            env=env,
            fresh=True if fresh else None,
        )
        done = await self._stream(req, on_stdout, on_stderr, on_result)
        return R.execution(req.id, req.fold, dict(done))

    async def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float | None = None,
        on_stdout: Callback[str] | None = None,
        on_stderr: Callback[str] | None = None,
    ) -> R.CommandResult:
        """Run ``command`` with ``/bin/sh -c`` in the sandbox."""
        req = await self.request("exec", command=command, cwd=cwd, env=env, timeout_s=timeout_s)
        done = await self._stream(req, on_stdout, on_stderr)
        return R.command_result(req.id, req.fold, dict(done))

    async def create_context(
        self,
        language: str = "python",
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        context_id: str | None = None,
    ) -> str:
        done = await self.call("create_context", language=language, cwd=cwd, env=env, context=context_id)
        return str(done["context_id"])

    async def delete_context(self, context_id: str) -> None:
        await self.call("delete_context", context=context_id)

    async def restart_context(self, context_id: str) -> None:
        """A fresh worker for the context: its state is gone (a run in progress ends ``ContextRestarted``)."""
        await self.call("restart_context", context=context_id)

    async def set_env(self, env: dict[str, str], *, replace: bool = False) -> list[str]:
        """Set the session's environment (under every later run, exec and process); returns its names."""
        return list((await self.call("set_env", env=env, replace=replace or None))["names"])

    async def list_contexts(self) -> list[R.ContextInfo]:
        return R.contexts(await self.call("list_contexts"))

    async def write_file(self, path: str, content: str | bytes) -> int:
        """Write a file (``bytes`` go as base64); returns its size."""
        if isinstance(content, bytes):
            done = await self.call(
                "write_file", path=path, content=base64.b64encode(content).decode(), encoding="base64"
            )
        else:
            done = await self.call("write_file", path=path, content=content)
        return int(done.get("size") or 0)

    async def read_text(self, path: str) -> str:
        done = await self.call("read_file", path=path, encoding="utf-8")
        return str(done["content"])

    async def read_bytes(self, path: str) -> bytes:
        done = await self.call("read_file", path=path, encoding="base64")
        return base64.b64decode(done["content"])

    async def list_files(self, path: str = ".") -> list[R.FileEntry]:
        return R.entries(await self.call("list_files", path=path))

    async def delete_file(self, path: str, *, recursive: bool = False) -> None:
        await self.call("delete_file", path=path, recursive=recursive or None)

    async def mkdir(self, path: str) -> None:
        await self.call("mkdir", path=path)

    async def start_process(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        process_id: str | None = None,
    ) -> Process:
        """Start a background process; its output arrives on the returned ``Process``."""
        pid = process_id or f"p-{self._prefix}-{next(self._ids)}"
        proc = self._processes[pid] = Process(self, pid, command, self._process_buffer)
        try:
            done = await self.call("start_process", command=command, cwd=cwd, env=env, process_id=pid)
        except BaseException:
            self._processes.pop(pid, None)
            raise
        pid_num = done.get("pid")
        proc.pid = pid_num if isinstance(pid_num, int) else None
        return proc

    def process(self, process_id: str) -> Process | None:
        """The handle of a process this client has seen."""
        return self._processes.get(process_id)

    async def kill_process(self, process_id: str, *, signal: str | int | None = None) -> None:
        await self.call("kill_process", process_id=process_id, signal=signal)

    async def list_processes(self) -> list[R.ProcessInfo]:
        return R.processes(await self.call("list_processes"))

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request in flight; ``True`` if the server found it (it then ends with ``Cancelled``)."""
        done = await self.call("cancel", target=request_id)
        return bool(done.get("found"))

    async def ping(self) -> float:
        """A round trip to the server, in seconds."""
        start = time.perf_counter()
        await self.call("ping")
        return time.perf_counter() - start

    async def assist(
        self,
        prompt: str,
        *,
        language: str | None = None,
        max_iterations: int | None = None,
        context: str | None = None,
        on_token: Callback[str] | None = None,
        on_stdout: Callback[str] | None = None,
        on_stderr: Callback[str] | None = None,
        on_result: Callback[R.Result] | None = None,
        on_frame: Callback[Frame] | None = None,
    ) -> R.AssistResult:
        """Ask the server's model, which writes code that runs in this session until it works.

        ``on_token`` gets the model's text as it streams; ``on_frame`` every frame
        (``code``, ``attempt``...).
        """
        req = await self.request(
            "assist", prompt=prompt, language=language, max_iterations=max_iterations, context=context
        )

        async def frames(frame: Frame) -> None:
            if frame["type"] == "token" and on_token is not None:
                out = on_token(frame["text"])
                if asyncio.iscoroutine(out):
                    await out
            if on_frame is not None:
                out = on_frame(frame)
                if asyncio.iscoroutine(out):
                    await out

        done = await self._stream(req, on_stdout, on_stderr, on_result, frames)
        return R.assist_result(req.id, req.fold, "".join(req.tokens), dict(done))


@contextlib.asynccontextmanager
async def connect(
    url: str,
    token: str | None = None,
    *,
    on_event: Callable[[Frame], None] | None = None,
    open_timeout: float = 60.0,
    resume: bool = True,
    process_buffer_frames: int = 10_000,
) -> AsyncIterator[Session]:
    """Open a session; ``async with connect("ws://127.0.0.1:8000", "tok1") as session: ...``.

    ``on_event`` gets the frames that belong to no request: ``gap``,
    ``sandbox_replaced``, ``error`` without a request id, and ``ready`` after
    each resume. Raises ``ConnectError`` (``AuthError`` for a refused token).
    """
    session = Session(
        url,
        token,
        on_event=on_event,
        open_timeout=open_timeout,
        resume=resume,
        process_buffer_frames=process_buffer_frames,
    )
    await session.open()
    try:
        yield session
    finally:
        await session.close()
