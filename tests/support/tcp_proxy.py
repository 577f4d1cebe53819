"""A TCP proxy on loopback whose connections a test can stall and cut, like a failing network.

    async with TcpProxy(port) as proxy:   # listens on 127.0.0.1:proxy.port
        proxy.hold_down = True            # stop reading what the server sends
        proxy.swallow_up = True           # read what the client sends, forward nothing
        proxy.cut()                       # abort every connection (no close frame, no FIN)

New connections always forward both ways until told otherwise.
"""

from __future__ import annotations

import asyncio


class TcpProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.swallow_up = False
        self.connections = 0
        self.swallowed = 0  # bytes read from clients and not forwarded
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def hold_down(self) -> bool:
        return not self._flowing.is_set()

    @hold_down.setter
    def hold_down(self, value: bool) -> None:
        if value:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_listener(self) -> None:
        """Refuse new connections from now on."""
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        """Abort every open connection, both sides, and forward normally from now on."""
        self.hold_down = False
        self.swallow_up = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((writer, up_writer))
        for coro in (self._pump(reader, up_writer, up=True), self._pump(up_reader, writer, up=False)):
            t = asyncio.create_task(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if not up:
                    await self._flowing.wait()
                    if writer not in self._writers:
                        break  # cut while held: what the server sent is lost, as on a dead link
                if up and self.swallow_up:
                    self.swallowed += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
