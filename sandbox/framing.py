"""Framing between the server and the in-container agent. No I/O here.

The agent speaks newline-delimited JSON (one object per line, UTF-8; JSON
never contains a raw newline). Between the agent and us sits, for the docker
backend, Docker's attach stream: with no TTY, every chunk the container
writes is prefixed by an 8-byte header ``[stream, 0, 0, 0, size (u32 BE)]``
where stream is 1 for stdout and 2 for stderr.

``DockerDemux`` undoes the multiplexing, ``LineSplitter`` cuts a byte stream
into lines, ``encode``/``decode`` turn objects into lines and back, and
``check_event`` holds an agent event to the agent's schema.

Everything read from the agent is untrusted: it runs in the same container as
the code it runs. Both buffers are bounded (a frame over the bound is a
FramingError, which loses the sandbox), and an event that is not one the agent
sends, in the shape it sends it, is a FramingError too.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import orjson

STDOUT = 1
STDERR = 2
_HEADER = struct.Struct(">BxxxL")


class FramingError(Exception):
    """The byte stream does not follow the framing."""


class DockerDemux:
    """Split Docker's multiplexed attach stream into (stream, payload) pairs.

    >>> d = DockerDemux()
    >>> d.feed(b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x02hi")
    [(1, b'hi')]
    """

    def __init__(self, max_frame: int = 256 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 8:
            stream, size = _HEADER.unpack_from(buf, pos)
            if stream not in (0, 1, 2):
                raise FramingError(f"expected a stream id of 0, 1 or 2 in the attach header, got {stream}")
            if size > self.max_frame:
                raise FramingError(f"expected an attach frame of at most {self.max_frame} bytes, got {size}")
            if len(buf) - pos - 8 < size:
                break
            out.append((stream, bytes(buf[pos + 8 : pos + 8 + size])))
            pos += 8 + size
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


class LineSplitter:
    """Cut a byte stream into complete lines (without the newline).

    A line longer than ``max_line`` raises FramingError: the agent never
    writes one, so it means a corrupt stream, and buffering it would be
    unbounded.
    """

    def __init__(self, max_line: int = 256 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        last = data.rfind(b"\n")
        if last < 0:
            buf += data
            if len(buf) > self.max_line:
                raise FramingError(f"expected a newline within {self.max_line} bytes")
            return []
        if buf:
            if len(buf) + last > self.max_line:
                raise FramingError(f"expected a newline within {self.max_line} bytes")
            buf += data[:last]
            lines = bytes(buf).split(b"\n")
            buf.clear()
        else:
            lines = data[:last].split(b"\n")
        if last + 1 < len(data):
            buf += data[last + 1 :]
            if len(buf) > self.max_line:
                raise FramingError(f"expected a newline within {self.max_line} bytes")
        return lines

    @property
    def pending(self) -> int:
        return len(self._buf)


def encode(obj: dict[str, Any]) -> bytes:
    """One agent frame: compact JSON plus a newline."""
    return orjson.dumps(obj) + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one agent line; FramingError if it is not a JSON object."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise FramingError(f"expected a JSON object from the agent, got {line[:80]!r}: {exc}") from None
    if not isinstance(obj, dict):
        raise FramingError(f"expected a JSON object from the agent, got {type(obj).__name__}")
    return obj


# The fields a ``done`` may carry on to the client, and their types: nothing else of the agent's
# passes (a forged ``type``, ``seq`` or ``id`` must never reach the client's frame).
_DONE_FIELDS: dict[str, tuple[type, ...]] = {
    "ok": (bool,),
    "agent_ms": (int, float),
    "truncated": (bool,),
    "state_lost": (bool,),
    "context": (str,),
    "context_id": (str,),
    "contexts": (list,),
    "exit_code": (int, type(None)),
    "path": (str,),
    "size": (int,),
    "content": (str,),
    "encoding": (str,),
    "entries": (list,),
    "process_id": (str,),
    "pid": (int,),
    "processes": (list,),
    "found": (bool,),
    "pong": (bool,),
    "events": (int,),  # watch_files
    "reason": (str,),
    "sha256": (str,),  # upload_file, download_file
    "received": (int,),  # upload_chunk
    "bytes": (int,),  # terminal_input
    "cols": (int,),  # resize_terminal
    "rows": (int,),
    "execution_count": (int,),
}
FILE_EVENT_KINDS = ("created", "modified", "deleted", "moved", "overflow")
# A file event's fields and their types (kind and path are required; nothing else passes).
_FILE_EVENT_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "path": (str,),
    "from": (str,),
    "is_dir": (bool,),
    "count": (int,),
    "message": (str,),
}
_ERROR_FIELDS = ("name", "message", "traceback")
_ERROR_KINDS = ("user", "request")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_STREAMS = ("stdout", "stderr")
DISPLAY_ID_MAX = 256  # the agent's cut (groundloop_agent/pipes.py): a longer one is not from our agent


def _need(ok: bool, ev: dict[str, Any], what: str) -> None:
    if not ok:
        raise FramingError(f"expected {what} in a {ev.get('ev')!r} event of the agent")


def _lines(ev: dict[str, Any]) -> None:
    _need(ev.get("s") in _STREAMS, ev, "a stream of stdout or stderr")
    lines = ev.get("lines")
    _need(isinstance(lines, list) and all(isinstance(x, str) for x in lines), ev, "lines as a list of strings")


def check_event(ev: dict[str, Any]) -> dict[str, Any]:
    """The event as the server may use it, or FramingError: known events only, each field of the
    type the agent sends, a done's fields from a fixed list, an error's from name/message/traceback."""
    kind = ev.get("ev")
    if kind in ("out", "result", "clear", "done", "watching", "fev", "progress", "chunk", "tout"):
        _need(isinstance(ev.get("rid"), str), ev, "a string rid")
    if kind == "out":
        _lines(ev)
    elif kind == "result":
        _need(isinstance(ev.get("data"), dict), ev, "data as an object")
        _need(isinstance(ev.get("main", False), bool), ev, "main as a boolean")
        display_id = ev.get("display_id", "")
        _need(isinstance(display_id, str) and len(display_id) <= DISPLAY_ID_MAX, ev, "display_id as a short string")
        _need(isinstance(ev.get("update", False), bool), ev, "update as a boolean")
    elif kind == "clear":  # the code's clear_output()
        _need(isinstance(ev.get("wait"), bool), ev, "wait as a boolean")
    elif kind == "done":
        _need(isinstance(ev.get("ok"), bool), ev, "ok as a boolean")
        done: dict[str, Any] = {"ev": "done", "rid": ev["rid"]}
        for key, value in ev.items():
            types = _DONE_FIELDS.get(key)
            if types is None:
                continue  # ev, rid, error (below), or a field no client may see
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise FramingError(f"expected a valid {key} in a 'done' event of the agent")
            done[key] = value
        error = ev.get("error")
        if error is not None:
            _need(isinstance(error, dict), ev, "error as an object")
            _need(all(isinstance(error.get(k, ""), str) for k in _ERROR_FIELDS), ev, "error fields as strings")
            done["error"] = {k: error[k] for k in _ERROR_FIELDS if k in error}
            done["error"].setdefault("name", "Error")
            done["error"].setdefault("message", "")
            if error.get("kind") in _ERROR_KINDS:  # whose error it is; anything else is left to the server
                done["error"]["kind"] = error["kind"]
        return done
    elif kind == "pout":
        _need(isinstance(ev.get("proc"), str), ev, "a string proc")
        _lines(ev)
    elif kind == "pexit":
        _need(isinstance(ev.get("proc"), str), ev, "a string proc")
        _need(isinstance(ev.get("exit_code"), (int, type(None))), ev, "an integer exit_code")
    elif kind == "log":
        _need(isinstance(ev.get("message"), str), ev, "a string message")
    elif kind in ("watching", "fev", "progress", "chunk"):
        return _check_files_event(kind, ev)
    elif kind == "tout":  # a terminal's output: its bytes in base64, passed on to the client as they are
        data = ev.get("data")
        _need(isinstance(data, str) and _BASE64.fullmatch(data) is not None, ev, "data in base64")
    elif kind != "hello":
        raise FramingError(
            "expected an agent event (hello, out, result, clear, done, pout, pexit, log, watching, fev, progress,"
            f" chunk, tout), got {kind!r}"
        )
    return ev


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_files_event(kind: str, ev: dict[str, Any]) -> dict[str, Any]:
    """The events of watch_files and the chunked transfers, rebuilt from their known fields only."""
    rid = ev["rid"]
    if kind == "watching":
        _need(isinstance(ev.get("path"), str) and _int(ev.get("watches")), ev, "a path and a count of watches")
        return {"ev": kind, "rid": rid, "path": ev["path"], "watches": ev["watches"]}
    if kind == "progress":
        _need(_int(ev.get("bytes")) and _int(ev.get("total")), ev, "bytes and total as integers")
        return {"ev": kind, "rid": rid, "bytes": ev["bytes"], "total": ev["total"]}
    if kind == "chunk":
        _need(isinstance(ev.get("content"), str), ev, "content as a string")
        _need(_int(ev.get("offset")) and _int(ev.get("size")), ev, "offset and size as integers")
        return {"ev": kind, "rid": rid, "offset": ev["offset"], "content": ev["content"], "size": ev["size"]}
    events = ev.get("events")
    if not isinstance(events, list):
        raise FramingError(f"expected events as a list in a {kind!r} event of the agent")
    clean = []
    for item in events:
        _need(isinstance(item, dict), ev, "file events as objects")
        _need(item.get("kind") in FILE_EVENT_KINDS and isinstance(item.get("path"), str), ev, "a kind and a path")
        one: dict[str, Any] = {}
        for key, types in _FILE_EVENT_FIELDS.items():
            value = item.get(key)
            if value is None:
                continue
            _need(isinstance(value, types) and (bool in types or not isinstance(value, bool)), ev, f"a valid {key}")
            one[key] = value
        clean.append(one)
    return {"ev": kind, "rid": rid, "events": clean}
