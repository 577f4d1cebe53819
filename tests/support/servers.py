"""A real server for a test: ``run_server(settings, **create_app_kwargs)`` starts uvicorn on 127.0.0.1
with a free port, in the test's event loop, and yields a ``RunningServer`` (.url ws://.../v1/ws,
.http http://..., .settings, .app, .state = app.state.groundloop). Clients: support/wsclient.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .env import server_settings


class RunningServer:
    def __init__(self, app, settings, port, uv):
        self.app = app
        self.settings = settings
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1/ws"
        self.http = f"http://127.0.0.1:{port}"
        self.uvicorn = uv

    @property
    def state(self):
        return self.app.state.groundloop


@contextlib.asynccontextmanager
async def run_server(settings=None, **create_app_kwargs: Any) -> AsyncIterator[RunningServer]:
    from groundloop.server.app import create_app, serve_in_process

    settings = settings if settings is not None else server_settings()
    app = create_app(settings, **create_app_kwargs)
    async with serve_in_process(app, settings) as uv:
        yield RunningServer(app, settings, uv.groundloop_port, uv)
