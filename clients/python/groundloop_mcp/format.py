"""Tool results for MCP, from the client's results (pure: no I/O).

Output goes back to the model as text sections (stdout, stderr, the last
expression's value, the error with its traceback); ``image/png`` results as
MCP image content. Each stream is cut to ``max_chars`` keeping its head and
its tail, with a note that says how much was cut, so the model never mistakes
a cut output for the whole.
"""

from __future__ import annotations

from groundloop.client import CommandResult, Execution, FileEntry, ProcessInfo, Result
from groundloop.client.results import Error
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent

DEFAULT_MAX_CHARS = 20_000
SERVER_CUT_NOTE = "[groundloop: the server dropped output past its max_output_bytes limit; the rest is lost]"


def truncate(text: str, max_chars: int) -> str:
    """``text``, or its head and tail around a note saying how many characters were cut."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    cut = len(text) - head - tail
    note = (
        f"\n[... groundloop: {cut} characters cut here: the output was {len(text)} characters, "
        f"showing the first {head} and the last {tail} ...]\n"
    )
    return text[:head] + note + text[-tail:]


def _section(title: str, text: str, max_chars: int) -> str:
    return f"[{title}]\n{truncate(text, max_chars)}".rstrip("\n")


def _error_text(error: Error, max_chars: int) -> str:
    body = str(error)
    if error.traceback:
        body += "\n" + truncate(error.traceback, max_chars)
    return _section("error", body, max_chars)


def _images(results: list[Result]) -> list[ContentBlock]:
    out: list[ContentBlock] = []
    for r in results:
        if "image/png" in r.data:
            out.append(ImageContent(type="image", data=r.data["image/png"], mime_type="image/png"))
    return out


def execution(run: Execution, max_chars: int = DEFAULT_MAX_CHARS) -> CallToolResult:
    parts: list[str] = []
    if run.stdout:
        parts.append(_section("stdout", run.stdout, max_chars))
    if run.stderr:
        parts.append(_section("stderr", run.stderr, max_chars))
    for r in run.results:
        if r.text is not None and (r.main or "image/png" not in r.data):
            parts.append(_section("result" if r.main else "display", r.text, max_chars))
    if run.truncated:
        parts.append(SERVER_CUT_NOTE)
    if run.error is not None:
        parts.append(_error_text(run.error, max_chars))
    if not parts:
        parts.append("(no output)")
    content: list[ContentBlock] = [TextContent(type="text", text="\n".join(parts))]
    content.extend(_images(run.results))
    return CallToolResult(content=content, is_error=not run.ok)


def command(cmd: CommandResult, max_chars: int = DEFAULT_MAX_CHARS) -> CallToolResult:
    parts: list[str] = []
    if cmd.stdout:
        parts.append(_section("stdout", cmd.stdout, max_chars))
    if cmd.stderr:
        parts.append(_section("stderr", cmd.stderr, max_chars))
    if cmd.truncated:
        parts.append(SERVER_CUT_NOTE)
    if cmd.error is not None:
        parts.append(_error_text(cmd.error, max_chars))
    parts.append(f"[exit code {cmd.exit_code}]" if cmd.exit_code is not None else "[no exit code]")
    failed = not cmd.ok or cmd.exit_code != 0
    return CallToolResult(content=[TextContent(type="text", text="\n".join(parts))], is_error=failed)


def text(body: str, *, error: bool = False, max_chars: int = DEFAULT_MAX_CHARS) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=truncate(body, max_chars))], is_error=error)


def listing(path: str, entries: list[FileEntry]) -> str:
    if not entries:
        return f"{path}: empty"
    rows = [f"{e.type:<9} {e.size:>10}  {e.name}{'/' if e.type == 'directory' else ''}" for e in entries]
    return f"{path}:\n" + "\n".join(sorted(rows, key=lambda r: r.split()[-1]))


def processes(procs: list[ProcessInfo]) -> str:
    if not procs:
        return "no background processes"
    return "\n".join(
        f"{p.process_id}  pid {p.pid}  {'running' if p.running else f'exited {p.exit_code}'}  {p.command}"
        for p in procs
    )
