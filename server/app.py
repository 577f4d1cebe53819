"""The ASGI application: ``create_app(settings)`` and its one lifespan.

Start-up: the authenticator (refuses a non-loopback bind without tokens),
metrics, the sandbox engine (``make_backend`` + ``Engine.start`` unless one is
injected), the session manager and its reaper.

``groundloop serve`` drains first on SIGTERM (server/drain.py). Then the
shutdown, in order: uvicorn stops accepting and closes open sockets (1012);
the session manager closes every session (requests cancelled, sockets closed
1012 if still open, sandboxes released); the engine, if this app started it,
removes its pool. No container is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundloop.sandbox.engine import Engine, check_server_id, make_backend
from groundloop.sessions import logs
from groundloop.sessions.cache import ResultCache
from groundloop.sessions.manager import SessionManager
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import http, workspaces_http
from .auth import Authenticator, LoopbackHostOnly
from .connection import websocket_endpoint
from .metrics import Metrics
from .settings import Settings, SettingsError
from .uvicorn_adapter import RawSendStash

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@dataclass
class AppState:
    """Everything the handlers need, as ``app.state.groundloop``."""

    settings: Settings
    metrics: Metrics
    auth: Authenticator
    cache: ResultCache
    assist: Any = None
    engine: Engine | None = None
    manager: SessionManager | None = None
    owns_engine: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)


def _default_assist(settings: Settings, metrics: Metrics) -> Any:
    try:
        from groundloop.sessions.assist import AssistRunner
    except ImportError:
        return None
    client = None
    if settings.anthropic_api_key_file:
        # A mounted secret, not an environment variable: the key stays out of the pod spec,
        # `docker inspect` and every child process's environment.
        import anthropic

        client = anthropic.AsyncAnthropic(api_key=_read_secret(settings.anthropic_api_key_file))
    try:
        return AssistRunner(settings, metrics, client)
    except Exception as exc:  # pragma: no cover - the runner's own configuration trouble
        logs.event("error", message=f"assist is unavailable: {exc}")
        return None


def _read_secret(path: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(f"GROUNDLOOP_ANTHROPIC_API_KEY_FILE: cannot read {path}: {exc}") from None
    if not value:
        raise SettingsError(f"GROUNDLOOP_ANTHROPIC_API_KEY_FILE: {path} is empty")
    return value


@contextlib.contextmanager
def metrics_listener(settings: Settings, metrics: Metrics) -> Any:
    """/metrics on its own port (GROUNDLOOP_METRICS_PORT), for a scraper the public proxy never
    routes to. prometheus_client's own threaded server: the exposition is all it serves."""
    if not settings.metrics_port:
        yield None
        return
    from prometheus_client import start_http_server

    httpd, thread = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def transport_max_size(settings: Settings) -> int:
    """The transport's frame limit: frames between max_message_bytes and this get a
    ``too_large`` error frame and the connection stays; larger ones close 1009."""
    return 2 * settings.max_message_bytes + (64 << 10)


def create_app(
    settings: Settings, *, engine: Engine | None = None, metrics: Metrics | None = None, assist: Any = None
) -> Starlette:
    check_server_id(settings.sandbox.server_id)
    auth = Authenticator(settings)
    if auth.anonymous and settings.metrics_port:
        # Anonymous mode answers loopback host names only (DNS rebinding); prometheus_client's listener
        # cannot check the Host header, so a rebound page could read it.
        raise SettingsError("GROUNDLOOP_METRICS_PORT needs tokens: the metrics listener cannot refuse a rebound Host")
    metrics = metrics if metrics is not None else Metrics()
    if assist is None:
        assist = _default_assist(settings, metrics)
    state = AppState(
        settings=settings,
        metrics=metrics,
        auth=auth,
        assist=assist,
        cache=ResultCache(settings.cache_entries, settings.cache_ttl_s),
        engine=engine,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if state.engine is None:
            backend = await make_backend(settings.sandbox, bind_host=settings.host)
            state.engine = Engine(backend, settings.sandbox, hooks=metrics)
            state.owns_engine = True
        eng = state.engine
        if getattr(eng, "_refill_task", None) is None:
            await eng.start()
            state.owns_engine = True
        metrics.pool_size.set(eng.pool_size)
        state.manager = SessionManager(settings, eng, metrics, assist)
        state.manager.start()
        logs.event(
            "started",
            host=settings.host,
            port=settings.port,
            backend=eng.backend.name,
            runtime=eng.backend.runtime,
            anonymous=auth.anonymous,
        )
        state.started.set()
        try:
            with metrics_listener(settings, metrics):
                yield
        finally:
            await state.manager.close()
            if state.owns_engine:
                await eng.close()
            logs.event("stopped")

    routes: list[Any] = [
        WebSocketRoute("/v1/ws", websocket_endpoint),
        Route("/healthz", http.healthz),
        Route("/readyz", http.readyz),
        Route("/metrics", http.metrics),
        Route("/v1/validate-code", http.validate_code, methods=["POST"]),
        Route("/v1/workspaces", workspaces_http.list_workspaces, methods=["GET"]),
        Route("/v1/workspaces/{name}", workspaces_http.delete_workspace, methods=["DELETE"]),
        Route("/v1/workspaces/{name}/snapshots/{snapshot}", workspaces_http.delete_snapshot, methods=["DELETE"]),
    ]
    static = Path(settings.static_dir) if settings.static_dir else STATIC_DIR
    if static.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=str(static), html=True)))
    else:
        routes.append(Route("/", lambda request: PlainTextResponse("no static page is installed", 404)))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(LoopbackHostOnly, auth=auth), Middleware(RawSendStash)],
    )
    app.state.groundloop = state
    return app


def uvicorn_config(
    app: Any, settings: Settings, *, host: str | None = None, port: int | None = None, **overrides: Any
) -> Any:
    """The uvicorn configuration groundloop runs with (also used by the tests)."""
    import uvicorn

    from .uvicorn_adapter import GuardedWSProtocol, http_protocol

    if settings.loop not in ("auto", "uvloop", "asyncio"):
        raise SettingsError(f"GROUNDLOOP_LOOP: expected auto, uvloop or asyncio, got {settings.loop!r}")
    kw: dict[str, Any] = dict(
        host=settings.host if host is None else host,
        loop=settings.loop,
        port=settings.port if port is None else port,
        http=http_protocol(settings),
        ws=GuardedWSProtocol,  # websockets-sansio
        h11_max_incomplete_event_size=settings.max_header_bytes,
        ws_max_size=transport_max_size(settings),
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    kw.update(overrides)
    return uvicorn.Config(app, **kw)


@contextlib.asynccontextmanager
async def serve_in_process(app: Starlette, settings: Settings, *, log_level: str = "warning"):
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in this event loop; yields the uvicorn server.

    For tests and benchmarks: no signal handlers are installed, so a hung run
    still dies from its timeout. The port is ``server.groundloop_port``.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level=log_level))
    server.groundloop_port = port  # type: ignore[attr-defined]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    started = asyncio.ensure_future(app.state.groundloop.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        sock.close()
        task.result()
        raise RuntimeError("the server did not start")
    try:
        yield server
    finally:
        server.should_exit = True
        await task
        sock.close()
