"""groundloop.v1 wire protocol: pure parsing and frame building, no I/O.

A client frame is one JSON object with ``type`` and ``id``. ``parse_request``
turns the frame's bytes (or text) into a typed ``Request`` or raises
``ProtocolError`` with the protocol error code:

- ``too_large``   the frame is over the size limit;
- ``bad_request`` not JSON, not an object, unknown ``type``, a missing or
  malformed ``id``, a field of the wrong type, or a field the request does not
  have (the table ``SPECS``: a client must learn that its field was not used).

When the ``id`` could be read, the error carries it (``ProtocolError.id``) so
the caller can end that request with a ``done``.

Server frames are dicts built here and serialized once with orjson
(``encode``); the session's outbox splices ``seq`` in when the frame is queued.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from .errors import ProtocolError

PROTOCOL = "groundloop.v1"
LANGUAGES = ("python", "javascript", "typescript", "bash")
ASSIST_LANGUAGES = ("python", "javascript")
ENCODINGS = ("utf-8", "utf8", "base64")

_STR, _NUM, _INT, _BOOL, _ENV, _ID = "str", "num", "int", "bool", "env", "id"

# type -> {field: (kind, required)}
SPECS: dict[str, dict[str, tuple[str, bool]]] = {
    "run_code": {
        "code": (_STR, True),
        "language": (_STR, False),
        "context": (_STR, False),
        "timeout_s": (_NUM, False),
        "env": (_ENV, False),
        "fresh": (_BOOL, False),
    },
    "exec": {"command": (_STR, True), "cwd": (_STR, False), "env": (_ENV, False), "timeout_s": (_NUM, False)},
    "create_context": {"language": (_STR, False), "cwd": (_STR, False), "env": (_ENV, False), "context": (_STR, False)},
    "delete_context": {"context": (_STR, True)},
    "list_contexts": {},
    "write_file": {"path": (_STR, True), "content": (_STR, True), "encoding": (_STR, False)},
    "read_file": {"path": (_STR, True), "encoding": (_STR, False)},
    "list_files": {"path": (_STR, False)},
    "delete_file": {"path": (_STR, True), "recursive": (_BOOL, False)},
    "mkdir": {"path": (_STR, True)},
    "start_process": {"command": (_STR, True), "cwd": (_STR, False), "env": (_ENV, False), "process_id": (_STR, False)},
    "kill_process": {"process_id": (_STR, True), "signal": (_INT, False)},
    "list_processes": {},
    "cancel": {"target": (_ID, True)},
    "assist": {
        "prompt": (_STR, True),
        "language": (_STR, False),
        "max_iterations": (_INT, False),
        "context": (_STR, False),
    },
    "ping": {},
    "watch_files": {"path": (_STR, False), "recursive": (_BOOL, False)},
    "upload_file": {"path": (_STR, True), "size": (_INT, True)},
    "upload_chunk": {"upload": (_ID, True), "offset": (_INT, True), "content": (_STR, True)},
    "download_file": {"path": (_STR, True), "chunk_bytes": (_INT, False)},
    "open_terminal": {
        "cols": (_INT, True),
        "rows": (_INT, True),
        "cwd": (_STR, False),
        "env": (_ENV, False),
        "command": (_STR, False),
    },
    "terminal_input": {"terminal": (_ID, True), "data": (_STR, True), "encoding": (_STR, False)},
    "resize_terminal": {"terminal": (_ID, True), "cols": (_INT, True), "rows": (_INT, True)},
    "close_terminal": {"terminal": (_ID, True)},
    "snapshot": {"snapshot": (_STR, False)},
    "restore": {"snapshot": (_STR, True)},
    "list_snapshots": {},
    "restart_context": {"context": (_STR, True)},
    "set_env": {"env": (_ENV, True), "replace": (_BOOL, False)},
    "close_session": {},
}
REQUEST_TYPES = frozenset(SPECS)
# Requests that run code or commands: audited, and counted in execution metrics.
EXECUTIONS = frozenset({"run_code", "exec", "start_process", "assist"})
# What ``ready.features`` lists besides the request types: capabilities a client checks before it sends.
CAPABILITIES = (
    "run_code.env",
    "session_env",
    "done.execution_count",
    "error.kind",
    "strict_fields",
    "display_updates",
    "run_code.fresh",
)


@dataclass(frozen=True, slots=True)
class Request:
    """One validated client request. ``params`` holds only the fields of SPECS that were given."""

    type: str
    id: str | int
    params: dict[str, Any]


SHOWN_MAX = 64
"""How much of a client's value an error message echoes: a 16 MiB ``type`` used to come back twice
(in the error and in the done), so a client that sent big bogus frames and read nothing grew the
server by twice what it sent."""


_REPR = reprlib.Repr()  # never builds the whole repr of a big value
_REPR.maxstring = _REPR.maxother = SHOWN_MAX
_REPR.maxlist = _REPR.maxdict = 4
_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to about SHOWN_MAX characters (marked ``...``)."""
    text = _REPR.repr(value)
    return text if len(text) <= 2 * SHOWN_MAX else text[: 2 * SHOWN_MAX] + "..."


def _valid_id(value: Any) -> TypeGuard[str | int]:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return 0 < len(value) <= 256
    return isinstance(value, int)


def _check(kind: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _ENV:
        # What an environment can hold: a name without "=" or NUL, a value without NUL.
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k and "\0" not in v
            for k, v in value.items()
        )
    if kind == _ID:
        return _valid_id(value)
    raise AssertionError(kind)


_ENVELOPE = ("type", "id")

_KIND_TEXT = {
    _STR: "a string",
    _NUM: "a positive number",
    _INT: "an integer",
    _BOOL: "a boolean",
    _ENV: "an object of strings (names without `=` or NUL, values without NUL)",
    _ID: "a request id (string or integer)",
}


def parse_request(data: bytes | str, max_bytes: int | None = None) -> Request:
    """Parse and validate one client frame. Raises ProtocolError."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError(f"the frame is {size} bytes, over the limit of {max_bytes} bytes", code="too_large")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must be a JSON object")
    rid = obj.get("id")
    if not _valid_id(rid):
        raise ProtocolError("every request needs an `id` (a non-empty string, or an integer)")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in SPECS:
        raise ProtocolError(f"unknown request type {shown(kind)}", id=rid)
    spec = SPECS[kind]
    params: dict[str, Any] = {}
    # null means absent, here as everywhere: a client that sends every optional field as null stays valid.
    unknown = [k for k, v in obj.items() if k not in spec and k not in _ENVELOPE and v is not None]
    if unknown:
        names = ", ".join(f"`{shown(k)[1:-1]}`" for k in sorted(unknown)[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise ProtocolError(f"{kind} has no field {names}{more}", id=rid)
    for name, (fkind, required) in spec.items():
        if name not in obj or obj[name] is None:
            if required:
                raise ProtocolError(f"{kind} needs `{name}` ({_KIND_TEXT[fkind]})", id=rid)
            continue
        value = obj[name]
        if not _check(fkind, value):
            raise ProtocolError(f"`{name}` of {kind} must be {_KIND_TEXT[fkind]}", id=rid)
        params[name] = value
    lang = params.get("language")
    if lang is not None and lang not in LANGUAGES:
        raise ProtocolError(f"unsupported language {shown(lang)} ({', '.join(LANGUAGES)})", id=rid)
    if kind == "assist" and lang not in (None, *ASSIST_LANGUAGES):
        raise ProtocolError(f"assist runs {' or '.join(ASSIST_LANGUAGES)}, not {shown(lang)}", id=rid)
    enc = params.get("encoding")
    if enc is not None and enc not in ENCODINGS:
        raise ProtocolError(f"unknown encoding {shown(enc)} (utf-8 or base64)", id=rid)
    if kind == "assist" and params.get("max_iterations", 1) < 1:
        raise ProtocolError("max_iterations must be at least 1", id=rid)
    if params.get("fresh") and "context" in params:
        raise ProtocolError("`fresh` runs in a new context of its own: it takes no `context`", id=rid)
    return Request(kind, rid, params)


# ---- server frames


def encode(frame: dict[str, Any]) -> bytes:
    """Serialize a frame (without ``seq``); the outbox splices ``seq`` in."""
    return orjson.dumps(frame)


SEQ_HEAD = b'{"seq":%d,'
"""What every frame starts with on the wire (``SEQ_HEAD % seq``); its rest is the encoded frame without
its opening brace."""


def with_seq(seq: int, body: bytes) -> bytes:
    """``{"seq":N,...rest of body}``: body must be an encoded non-empty object."""
    return SEQ_HEAD % seq + body[1:]


def features(languages: Any = None) -> list[str]:
    """``ready.features``: every request type, the capabilities, and ``language:<name>`` for each language
    the sandbox runs (``languages``: what its agent said at hello; None: all of LANGUAGES)."""
    langs = [x for x in LANGUAGES if languages is None or x in languages]
    return sorted(REQUEST_TYPES) + list(CAPABILITIES) + [f"language:{x}" for x in langs]


def ready_frame(
    session_id: str, resumed: bool, sandbox: dict[str, Any], limits: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "type": "ready",
        "session_id": session_id,
        "resumed": resumed,
        "sandbox": sandbox,
        "limits": limits,
        "protocol": PROTOCOL,
        **extra,
    }


def error_frame(code: str, message: str, id: Any = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if id is not None:
        frame["id"] = id
    frame.update(extra)
    return frame


def done_frame(
    id: Any, ok: bool, duration_ms: float, error: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "done", "id": id, "ok": ok, "duration_ms": round(duration_ms, 3)}
    if error is not None and not ok:
        frame["error"] = error
    frame.update(extra)
    return frame


def failure(name: str, message: str, traceback: str | None = None, kind: str = "request") -> dict[str, Any]:
    err = {"name": name, "message": message, "kind": kind}
    if traceback:
        err["traceback"] = traceback
    return err


def output_frame(stream: str, id: Any, text: str, **extra: Any) -> dict[str, Any]:
    return {"type": stream, "id": id, "text": text, **extra}


def output_frame_parts(stream: str, id: Any, **extra: Any) -> tuple[bytes, bytes]:
    """An output frame, encoded without its opening brace, cut around its line: ``before +
    orjson.dumps(line) + after == encode(output_frame(stream, id, line, **extra))[1:]``. So the
    many lines of one request go out with the rest of their frame serialized once."""
    rest = encode(output_frame(stream, id, "\0", **extra))[1:]
    # Unambiguous: inside an encoded string, quotes are escaped; only the text key has this form.
    before, after = rest.split(b'"text":"\\u0000"', 1)
    return before + b'"text":', after


def gap_frame(missed: int, first: int, last: int) -> dict[str, Any]:
    return {
        "type": "gap",
        "missed": missed,
        "message": f"{missed} frames after last_seq were evicted from the replay buffer and are lost",
        "first_missed_seq": first,
        "last_missed_seq": last,
    }
