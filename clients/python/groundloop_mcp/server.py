"""``groundloop mcp``: a Model Context Protocol server that holds one groundloop session.

An MCP client (an editor, an agent) gets tools that run code, shell commands,
files and background processes in that session's sandbox. The session is
opened on the first tool call and opened again, with a note in the result, if
the server ended it (idle timeout, restart). Without a server URL, a groundloop
server runs in this process on a random loopback port with a random token.

Transports: stdio (what editors spawn) or streamable HTTP (``--transport http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any, Literal

from groundloop.client import GroundloopError, RequestError, Session
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from . import format as fmt

INSTRUCTIONS = """\
Runs code for real in a groundloop sandbox (a hardened container) and returns its output.
Variables, imports and the working directory persist between run_code calls of the same language;
files live in /workspace (relative paths start there) and are shared by code, shell and processes.
Use start_process for servers and long jobs, process_output to read them, stop_process to end them."""


class SessionHolder:
    """One groundloop session for every tool call, opened on first use and reopened if it ended."""

    def __init__(self, url: str, token: str | None, *, open_timeout: float = 60.0):
        self.url = url
        self.token = token
        self.open_timeout = open_timeout
        self._session: Session | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> tuple[Session, str | None]:
        """The live session, and a note for the model when it is a new one replacing an ended one."""
        async with self._lock:
            if self._session is not None and self._session.closed is None:
                return self._session, None
            note = None
            if self._session is not None:
                note = (
                    f"[groundloop: the previous session ended ({self._session.closed}); this is a new session: "
                    "variables, files and processes from before are gone]"
                )
                await self._session.close()
                self._session = None
            session = Session(self.url, self.token, open_timeout=self.open_timeout)
            await session.open()
            self._session = session
            return session, note

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _with_note(result: CallToolResult, note: str | None) -> CallToolResult:
    if note:
        result.content.insert(0, fmt.TextContent(type="text", text=note))
    return result


Tool = Callable[..., Awaitable[CallToolResult]]


def build_server(holder: SessionHolder, *, max_chars: int = fmt.DEFAULT_MAX_CHARS) -> MCPServer:
    try:
        version = metadata.version("groundloop")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "0"
    mcp: MCPServer = MCPServer("groundloop", version=version, instructions=INSTRUCTIONS, log_level="WARNING")

    def tool(*, read_only: bool = False, destructive: bool = False) -> Callable[[Tool], Tool]:
        """Register a tool whose failures come back as error results the model can read."""

        def wrap(fn: Tool) -> Tool:
            @functools.wraps(fn)
            async def guarded(*args: Any, **kwargs: Any) -> CallToolResult:
                try:
                    return await fn(*args, **kwargs)
                except RequestError as exc:
                    return fmt.text(f"{exc.name}: {exc.message}".rstrip(": "), error=True, max_chars=max_chars)
                except GroundloopError as exc:
                    return fmt.text(f"groundloop: {exc}", error=True, max_chars=max_chars)

            hints = ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive, open_world_hint=False)
            mcp.add_tool(guarded, annotations=hints)
            return guarded

        return wrap

    @tool(destructive=True)
    async def run_code(
        code: Annotated[str, Field(description="the code; the value of its last expression is returned too")],
        language: Annotated[
            Literal["python", "javascript", "typescript", "bash"],
            Field(description="python, javascript, typescript or bash (a persistent shell)"),
        ] = "python",
        timeout_s: Annotated[float | None, Field(description="seconds before the run is stopped")] = None,
    ) -> CallToolResult:
        """Run Python, JavaScript, TypeScript or bash in the session's persistent interpreter of that language.

        Returns stdout, stderr, the last expression's value, images (PNG) and the error with its traceback.
        """
        session, note = await holder.get()
        run = await session.run_code(code, language=language, timeout_s=timeout_s)
        return _with_note(fmt.execution(run, max_chars), note)

    @tool(destructive=True)
    async def run_shell(
        command: Annotated[str, Field(description="a /bin/sh command line")],
        cwd: Annotated[str | None, Field(description="working directory (default /workspace)")] = None,
        timeout_s: Annotated[float | None, Field(description="seconds before the command is stopped")] = None,
    ) -> CallToolResult:
        """Run a shell command in the sandbox; returns its stdout, stderr and exit code."""
        session, note = await holder.get()
        cmd = await session.exec(command, cwd=cwd, timeout_s=timeout_s)
        return _with_note(fmt.command(cmd, max_chars), note)

    @tool(read_only=True)
    async def read_file(path: Annotated[str, Field(description="file path, relative to /workspace")]) -> CallToolResult:
        """Read a text file from the sandbox."""
        session, note = await holder.get()
        try:
            body = await session.read_text(path)
        except RequestError as exc:
            if exc.name != "UnicodeDecodeError":
                raise
            size = len(await session.read_bytes(path))
            body = f"[{path} is binary ({size} bytes) and is not shown]"
        return _with_note(fmt.text(body, max_chars=max_chars), note)

    @tool(destructive=True)
    async def write_file(
        path: Annotated[str, Field(description="file path, relative to /workspace; parents are created")],
        content: Annotated[str, Field(description="the whole new content (UTF-8 text)")],
    ) -> CallToolResult:
        """Create or overwrite a text file in the sandbox."""
        session, note = await holder.get()
        parent = os.path.dirname(path)
        if parent:
            await session.mkdir(parent)
        size = await session.write_file(path, content)
        return _with_note(fmt.text(f"wrote {size} bytes to {path}"), note)

    @tool(read_only=True)
    async def list_files(
        path: Annotated[str, Field(description="directory, relative to /workspace")] = ".",
    ) -> CallToolResult:
        """List a directory of the sandbox: type, size and name of each entry."""
        session, note = await holder.get()
        return _with_note(fmt.text(fmt.listing(path, await session.list_files(path)), max_chars=max_chars), note)

    @tool(destructive=True)
    async def start_process(
        command: Annotated[str, Field(description="a /bin/sh command line that keeps running (a server, a watcher)")],
        cwd: Annotated[str | None, Field(description="working directory (default /workspace)")] = None,
    ) -> CallToolResult:
        """Start a background process; read its output with process_output, end it with stop_process."""
        session, note = await holder.get()
        proc = await session.start_process(command, cwd=cwd)
        return _with_note(fmt.text(f"started process {proc.process_id} (pid {proc.pid})"), note)

    @tool(read_only=True)
    async def process_output(
        process_id: Annotated[str, Field(description="the id start_process returned")],
    ) -> CallToolResult:
        """The output a background process wrote since the last call, and whether it is still running."""
        session, note = await holder.get()
        proc = session.process(process_id)
        if proc is None:
            return fmt.text(f"no process {process_id} in this session\n{fmt.processes(await session.list_processes())}")
        return _with_note(fmt.text(_drain(proc), max_chars=max_chars), note)

    @tool(destructive=True)
    async def stop_process(
        process_id: Annotated[str, Field(description="the id start_process returned")],
    ) -> CallToolResult:
        """Stop a background process (SIGTERM, then SIGKILL after 1 s); returns its last output and exit code."""
        session, note = await holder.get()
        proc = session.process(process_id)
        await session.kill_process(process_id)
        if proc is None:
            return _with_note(fmt.text(f"stopped {process_id}"), note)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        return _with_note(fmt.text(_drain(proc), max_chars=max_chars), note)

    @tool(read_only=True)
    async def list_processes() -> CallToolResult:
        """The session's background processes: id, pid, state and command."""
        session, note = await holder.get()
        return _with_note(fmt.text(fmt.processes(await session.list_processes())), note)

    return mcp


def _drain(proc: Any) -> str:
    frames = proc.read()
    out = "".join(f["text"] for f in frames if f["type"] == "stdout")
    err = "".join(f["text"] for f in frames if f["type"] == "stderr")
    parts = []
    if proc.dropped:
        parts.append(f"[groundloop: {proc.dropped} older output lines were dropped: they were not read in time]")
    if any(f["type"] == "gap" for f in frames):
        parts.append("[groundloop: some output was lost while the connection was down]")
    if out:
        parts.append(f"[stdout]\n{out}".rstrip("\n"))
    if err:
        parts.append(f"[stderr]\n{err}".rstrip("\n"))
    if not out and not err:
        parts.append("(no new output)")
    if proc.lost:
        parts.append("[the sandbox was replaced: the process is gone]")
    elif proc.exited:
        parts.append(f"[exited with code {proc.exit_code}]")
    else:
        parts.append("[still running]")
    return "\n".join(parts)


@contextlib.asynccontextmanager
async def local_server() -> AsyncIterator[tuple[str, str]]:
    """A groundloop server in this process on a random loopback port; yields (url, token).

    The token is random so that other local users cannot drive the sandbox.
    """
    from groundloop.server.app import create_app, serve_in_process
    from groundloop.server.settings import Settings
    from groundloop.sessions import logs

    token = secrets.token_urlsafe(24)
    settings = Settings.from_env(host="127.0.0.1", tokens=[f"{token}:local"], tokens_file="")
    logs.setup(os.environ.get("GROUNDLOOP_LOG_LEVEL", "warning"))
    app = create_app(settings)
    async with serve_in_process(app, settings) as uv:
        yield f"ws://127.0.0.1:{uv.groundloop_port}/v1/ws", token


async def serve(
    url: str | None,
    token: str | None,
    *,
    transport: str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
    max_chars: int = fmt.DEFAULT_MAX_CHARS,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if not url:
            url, token = await stack.enter_async_context(local_server())
        assert url is not None
        holder = SessionHolder(url, token)
        stack.push_async_callback(holder.close)
        mcp = build_server(holder, max_chars=max_chars)
        if transport == "stdio":
            serving = asyncio.ensure_future(mcp.run_stdio_async())
        else:
            serving = asyncio.ensure_future(mcp.run_streamable_http_async(host=host, port=port))
        loop = asyncio.get_running_loop()
        # SIGTERM (an editor closing us) stops serving, not the clean-up after it: the
        # local server must get to remove its containers.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, serving.cancel)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        finally:
            serving.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)


def run(
    url: str | None,
    token: str | None,
    *,
    transport: str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
    max_chars: int = fmt.DEFAULT_MAX_CHARS,
) -> int:
    try:
        asyncio.run(serve(url, token, transport=transport, host=host, port=port, max_chars=max_chars))
    except KeyboardInterrupt:
        pass
    except GroundloopError as exc:
        print(f"groundloop mcp: {exc}", file=sys.stderr)
        return 1
    return 0
