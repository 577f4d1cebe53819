"""Typed results of requests, folded from their frames (pure: no I/O).

``Execution`` (``run_code``), ``CommandResult`` (``exec``), ``AssistResult``
(``assist``), and the small records of the listing requests.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError


@dataclass(frozen=True)
class Error:
    """What a failed request or run reports: ``name`` (``ZeroDivisionError``, ``Timeout``, ``Cancelled``...)."""

    name: str
    message: str
    traceback: str | None = None

    @classmethod
    def of(cls, raw: dict[str, Any] | None) -> Error | None:
        if not raw:
            return None
        return cls(str(raw.get("name") or "Error"), str(raw.get("message") or ""), raw.get("traceback"))

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.message else self.name


@dataclass(frozen=True)
class Result:
    """One rich result: a MIME bundle (``image/png`` is base64). ``main`` marks the last expression's value;
    ``display_id`` a display that later results may replace (``update``: this one replaces an earlier one)."""

    data: dict[str, str]
    main: bool = False
    display_id: str | None = None
    update: bool = False

    @classmethod
    def of(cls, frame: Mapping[str, Any]) -> Result:
        """The result of a ``result`` frame."""
        display_id = frame.get("display_id") or None
        return cls(
            dict(frame.get("data") or {}), bool(frame.get("main")), display_id, bool(display_id and frame.get("update"))
        )

    @property
    def text(self) -> str | None:
        return self.data.get("text/plain")

    def png(self) -> bytes | None:
        """The decoded ``image/png`` of the bundle, if it has one."""
        raw = self.data.get("image/png")
        return base64.b64decode(raw) if raw is not None else None


class _Fold:
    """Accumulates a request's output frames as they arrive (the caller may not be iterating), as a notebook
    shows them: an update replaces the results of its display id, ``clear_output`` drops what came before."""

    __slots__ = ("stdout", "stderr", "output", "results", "pending_clear", "shown")

    def __init__(self) -> None:
        self.shown: set[str] = set()  # the display ids this request showed (cleared ones too)
        self.clear()

    def clear(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.output = io.StringIO()
        self.results: list[Result] = []
        self.pending_clear = False

    def add(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "clear_output":
            if "iteration" in frame:
                return  # assist: a clear is its block's; the fold keeps every block's output
            if frame.get("wait"):
                self.pending_clear = True
            else:
                self.clear()
            return
        if kind not in ("stdout", "stderr", "result"):
            return
        result = Result.of(frame) if kind == "result" else None
        if result is not None and result.update:
            display_id = result.display_id
            if display_id not in self.shown:  # a display of an earlier request: kept, marked as an update
                self.results.append(result)
            else:  # this request's: replaced in place (or nothing, when a clear took it)
                same = dataclasses.replace(result, update=False)
                self.results = [same if r.display_id == display_id else r for r in self.results]
            return
        if self.pending_clear:
            self.clear()
        if result is not None:
            if result.display_id is not None:
                self.shown.add(result.display_id)
            self.results.append(result)
        else:
            text = frame.get("text") or ""
            (self.stdout if kind == "stdout" else self.stderr).write(text)
            self.output.write(text)


@dataclass(frozen=True)
class Execution:
    """The outcome of ``run_code``.

    ``output`` is stdout and stderr interleaved in the order they arrived;
    ``text`` the main result's ``text/plain`` (the value of the last
    expression); ``error`` is set when the code raised, timed out
    (``Timeout``), was cancelled (``Cancelled``) or lost its sandbox
    (``SandboxLost``). ``execution_count`` is the server's, when it sends one.
    """

    id: str
    ok: bool
    stdout: str
    stderr: str
    output: str
    results: list[Result]
    error: Error | None
    context: str | None
    duration_ms: float
    truncated: bool = False
    execution_count: int | None = None
    done: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str | None:
        main = [r for r in self.results if r.main]
        return main[-1].text if main else None

    def raise_for_error(self) -> Execution:
        """Raise ``RequestError`` when the run failed; return ``self`` otherwise."""
        if not self.ok:
            raise RequestError.from_done(self.done)
        return self


@dataclass(frozen=True)
class CommandResult:
    """The outcome of ``exec``: ``exit_code`` is ``None`` when the command did not finish (``error`` says why)."""

    id: str
    ok: bool
    exit_code: int | None
    stdout: str
    stderr: str
    output: str
    error: Error | None
    duration_ms: float
    truncated: bool = False
    done: dict[str, Any] = field(default_factory=dict, repr=False)

    def raise_for_error(self) -> CommandResult:
        if not self.ok:
            raise RequestError.from_done(self.done)
        return self


@dataclass(frozen=True)
class AssistResult:
    """The outcome of ``assist``: the final ``code``, its ``output`` tail, the model's streamed ``text``."""

    id: str
    ok: bool
    code: str
    output: str
    text: str
    iterations: int
    error: Error | None
    results: list[Result]
    usage: dict[str, Any]
    timings: dict[str, Any]
    cached: bool = False
    truncated: bool = False
    done: dict[str, Any] = field(default_factory=dict, repr=False)


def execution(rid: str, fold: _Fold, done: dict[str, Any]) -> Execution:
    count = done.get("execution_count")
    return Execution(
        id=rid,
        ok=bool(done.get("ok")),
        stdout=fold.stdout.getvalue(),
        stderr=fold.stderr.getvalue(),
        output=fold.output.getvalue(),
        results=list(fold.results),
        error=Error.of(done.get("error")),
        context=done.get("context"),
        duration_ms=float(done.get("duration_ms") or 0.0),
        truncated=bool(done.get("truncated")),
        execution_count=int(count) if isinstance(count, int) else None,
        done=done,
    )


def command_result(rid: str, fold: _Fold, done: dict[str, Any]) -> CommandResult:
    code = done.get("exit_code")
    return CommandResult(
        id=rid,
        ok=bool(done.get("ok")),
        exit_code=int(code) if isinstance(code, int) else None,
        stdout=fold.stdout.getvalue(),
        stderr=fold.stderr.getvalue(),
        output=fold.output.getvalue(),
        error=Error.of(done.get("error")),
        duration_ms=float(done.get("duration_ms") or 0.0),
        truncated=bool(done.get("truncated")),
        done=done,
    )


def assist_result(rid: str, fold: _Fold, tokens: str, done: dict[str, Any]) -> AssistResult:
    return AssistResult(
        id=rid,
        ok=bool(done.get("ok")),
        code=str(done.get("code") or ""),
        output=str(done.get("output") or ""),
        text=tokens,
        iterations=int(done.get("iterations") or 0),
        error=Error.of(done.get("error")),
        results=list(fold.results),
        usage=dict(done.get("usage") or {}),
        timings=dict(done.get("timings") or {}),
        cached=bool(done.get("cached")),
        truncated=bool(done.get("truncated")),
        done=done,
    )


@dataclass(frozen=True)
class ContextInfo:
    context_id: str
    language: str
    cwd: str | None = None
    runs: int = 0
    restarts: int = 0
    alive: bool = True


@dataclass(frozen=True)
class FileEntry:
    name: str
    type: str  # file, directory, symlink, other
    size: int
    mtime: float


@dataclass(frozen=True)
class ProcessInfo:
    process_id: str
    command: str
    pid: int | None
    running: bool
    exit_code: int | None
    started_at: float | None


def _pick(cls: type, raw: dict[str, Any]) -> Any:
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in raw.items() if k in names})


def contexts(done: dict[str, Any]) -> list[ContextInfo]:
    return [_pick(ContextInfo, c) for c in done.get("contexts") or []]


def entries(done: dict[str, Any]) -> list[FileEntry]:
    return [_pick(FileEntry, e) for e in done.get("entries") or []]


def processes(done: dict[str, Any]) -> list[ProcessInfo]:
    return [_pick(ProcessInfo, p) for p in done.get("processes") or []]


__all__ = [
    "AssistResult",
    "CommandResult",
    "ContextInfo",
    "Error",
    "Execution",
    "FileEntry",
    "ProcessInfo",
    "Result",
]
