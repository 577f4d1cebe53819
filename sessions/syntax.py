"""Syntax checks run on the server before model-written code reaches the sandbox.

``check_syntax(code, language)`` returns None when the code parses, else an
error dict ``{"name": "SyntaxError", "message": ..., "traceback": ...}`` with
the compiler's own words, ready for an ``attempt`` frame and for the
feedback to the model.

- Python: ``compile()`` with top-level ``await`` allowed, as the sandbox's
  Python worker does.
- JavaScript: ``node --check`` on a temporary file. The sandbox's worker
  runs a cell that uses top-level ``await`` inside an async function, so a
  failure that mentions ``await`` is checked again wrapped the same way.
  Without ``node`` on the server the check is skipped (the sandbox reports
  the syntax error when the code runs).
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import tempfile
import traceback

FILENAME = "<assist>"
NODE_TIMEOUT_S = 20.0


async def check_syntax(code: str, language: str) -> dict[str, str] | None:
    if language == "python":
        return check_python(code)
    if language == "javascript":
        return await check_javascript(code)
    return None


def check_python(code: str) -> dict[str, str] | None:
    try:
        compile(code, FILENAME, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except SyntaxError as exc:  # IndentationError and TabError included
        lines = traceback.format_exception_only(type(exc), exc)
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return {"name": type(exc).__name__, "message": f"{exc.msg}{where}", "traceback": "".join(lines)}
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        return {"name": "SyntaxError", "message": f"{type(exc).__name__}: {exc}"}
    return None


def node_path() -> str | None:
    return shutil.which("node")


async def check_javascript(code: str) -> dict[str, str] | None:
    node = node_path()
    if node is None:
        return None
    err = await _node_check(node, code)
    if err is not None and "await" in err["message"]:
        wrapped = await _node_check(node, "(async () => {\n" + code + "\n})();\n")
        if wrapped is None:
            return None
    return err


async def _node_check(node: str, code: str) -> dict[str, str] | None:
    fd, path = tempfile.mkstemp(prefix="groundloop-check-", suffix=".js")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(code)
        proc = await asyncio.create_subprocess_exec(
            node,
            "--check",
            path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
        except BaseException:
            # Timeout or cancel: do not leave the checker behind.
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode == 0:
            return None
        text = stderr.decode("utf-8", "replace").replace(path, FILENAME)
        return _node_error(text)
    except TimeoutError:
        return None  # a checker that hangs does not block the run: the sandbox will judge
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _node_error(text: str) -> dict[str, str]:
    """Keep node's report (location, caret, message), drop its internal stack frames."""
    lines = text.splitlines()
    message = next((ln.strip() for ln in lines if "Error:" in ln and not ln.startswith(" ")), "")
    report: list[str] = []
    for ln in lines:
        if ln.startswith("    at ") or ln.startswith("Node.js v"):
            break
        report.append(ln)
    name, _, msg = message.partition(": ")
    return {
        "name": name or "SyntaxError",
        "message": msg or message or text.strip()[:500],
        "traceback": "\n".join(report).strip() + "\n",
    }
