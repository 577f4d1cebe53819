"""A small groundloop.v1 client for tests: connect, read ``ready``, run requests.

    async with WSClient.connect(server.url, token="tok1") as c:
        frames = await c.request("run_code", code="print(1)")
        assert frames[-1]["type"] == "done"

Every received frame is checked for ``seq`` continuity (strictly +1, across
resumes when ``last_seq`` is passed back in).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT = 120.0
_IDS = itertools.count(1)  # unique across clients: a resumed session keeps its in-flight ids


class WSClient:
    def __init__(self, ws: ClientConnection, ready: dict[str, Any] | None):
        self.ws = ws
        self.ready = ready
        self.session_id = ready.get("session_id") if ready else None
        self.last_seq = ready["seq"] if ready else 0
        self.frames: list[dict[str, Any]] = []  # every frame received, in order
        self._by_id: dict[Any, list[dict[str, Any]]] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        subprotocol_token: bool = False,
        origin: str | None = None,
        session: str | None = None,
        last_seq: int | None = None,
        expect_ready: bool = True,
        **kw: Any,
    ) -> WSClient:
        headers = {}
        subprotocols = None
        if token and subprotocol_token:
            subprotocols = ["groundloop.v1", f"bearer.{token}"]
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        if session is not None:
            url = f"{url}?session={session}&last_seq={last_seq or 0}"
        ws = await websockets.connect(
            url,
            additional_headers=headers,
            subprotocols=subprotocols,
            origin=origin,
            compression=None,
            max_size=None,
            open_timeout=TIMEOUT,
            **kw,
        )
        if not expect_ready:
            return cls(ws, None)
        first = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if first.get("type") != "ready":
            await ws.close()
            raise ConnectionError(f"expected ready, got {first}")
        if session is not None:
            assert first["seq"] == (last_seq or 0) + 1, first
        c = cls(ws, first)
        c.frames.append(first)
        return c

    async def __aenter__(self) -> WSClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()

    def next_id(self) -> str:
        return f"r{next(_IDS)}"

    async def send(self, type: str, id: Any = None, **fields: Any) -> Any:
        rid = self.next_id() if id is None else id
        await self.ws.send(orjson.dumps({"type": type, "id": rid, **fields}).decode())
        return rid

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame; checks seq continuity."""
        frame = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if "seq" in frame and frame["seq"] != 0:
            assert frame["seq"] == self.last_seq + 1, f"seq gap: {self.last_seq} -> {frame['seq']}: {frame}"
            self.last_seq = frame["seq"]
        self.frames.append(frame)
        rid = frame.get("id")
        if rid is not None:
            self._by_id.setdefault(rid, []).append(frame)
        return frame

    async def until_done(self, rid: Any, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Frames of request ``rid`` up to and including its done (others are kept)."""
        if any(f["type"] == "done" for f in self._by_id.get(rid, [])):
            return self._by_id[rid]
        while True:
            frame = await self.recv(timeout)
            if frame.get("id") == rid and frame["type"] == "done":
                return self._by_id[rid]

    async def request(self, type: str, id: Any = None, **fields: Any) -> list[dict[str, Any]]:
        rid = await self.send(type, id, **fields)
        return await self.until_done(rid)

    async def call(self, type: str, **fields: Any) -> dict[str, Any]:
        """The done frame of one request."""
        frames = await self.request(type, **fields)
        return frames[-1]

    def of(self, rid: Any, type: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self._by_id.get(rid, []) if type is None or f["type"] == type]

    @staticmethod
    def text(frames: list[dict[str, Any]], stream: str = "stdout") -> str:
        return "".join(f["text"] for f in frames if f["type"] == stream)
