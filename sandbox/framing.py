"""Framing between the server and the in-container agent. No I/O here.

The agent speaks newline-delimited JSON (one object per line, UTF-8; JSON
never contains a raw newline). Between the agent and us sits, for the docker
backend, Docker's attach stream: with no TTY, every chunk the container
writes is prefixed by an 8-byte header ``[stream, 0, 0, 0, size (u32 BE)]``
where stream is 1 for stdout and 2 for stderr.

``DockerDemux`` undoes the multiplexing, ``LineSplitter`` cuts a byte stream
into lines, ``encode``/``decode`` turn objects into lines and back.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 8:
            stream, size = _HEADER.unpack_from(buf, pos)
            if stream not in (0, 1, 2):
                raise FramingError(f"expected a stream id of 0, 1 or 2 in the attach header, got {stream}")
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
            buf += data[:last]
            lines = bytes(buf).split(b"\n")
            buf.clear()
        else:
            lines = data[:last].split(b"\n")
        if last + 1 < len(data):
            buf += data[last + 1 :]
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
