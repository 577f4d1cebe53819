"""The sandbox engine: a backend, a warm pool, and every live sandbox.

``Engine.acquire()`` hands out a sandbox that is already started and
handshaken when the pool has one (a queue pop), or starts one cold. The
pool refills in one background task owned by the engine. ``Engine.close()``
stops the refill and removes every sandbox this engine started.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .base import Backend, Sandbox, SandboxUnavailable, State
from .settings import SandboxSettings, SettingsError

log = logging.getLogger("groundloop.sandbox")


class EngineHooks:
    """Metrics seam: the server's metrics object implements these."""

    def sandbox_acquired(self, source: str, seconds: float) -> None: ...

    def sandbox_started(self, seconds: float) -> None: ...

    def sandboxes_changed(self, counts: dict[str, int]) -> None: ...

    def containers_reaped(self, n: int) -> None: ...


SERVER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
# How long close waits for starts and removals in flight (runsc: a start ~1 s, a removal ~0.2 s).
CLOSE_REMOVALS_S = 30.0


def new_session_id(server_id: str = "") -> str:
    """A random session id; in a fleet, prefixed with the id of the server that holds it.

    The prefix is what lets a proxy send ``/v1/ws?session=<id>`` to its owner with no
    shared state between servers (deploy/haproxy.cfg). The random part has no dot,
    so the owner is everything before the first one.
    """
    token = secrets.token_urlsafe(18)
    return f"{server_id}.{token}" if server_id else token


def check_server_id(server_id: str) -> None:
    """Refuse a server id a proxy could not match (empty means: no prefix)."""
    if server_id and not SERVER_ID.fullmatch(server_id):
        raise SettingsError(
            f"GROUNDLOOP_SERVER_ID: expected 1 to 63 letters, digits or '-' (no dot), got {server_id!r}"
        )


async def make_backend(
    settings: SandboxSettings, *, bind_host: str = "127.0.0.1", instance: str | None = None
) -> Backend:
    """Choose the backend: docker unless local is asked for (or allowed as a fallback)."""
    if settings.backend == "local":
        from .local_backend import LocalBackend

        return LocalBackend(settings)
    if settings.backend != "docker":
        raise SandboxUnavailable(f"unknown sandbox backend {settings.backend!r} (docker or local)")
    from .docker_backend import DockerBackend

    backend = DockerBackend(settings, instance=instance)
    if await backend.ping():
        return backend
    if settings.allow_local and is_loopback(bind_host):
        from .local_backend import LocalBackend

        log.warning("Docker is unreachable: falling back to the LOCAL backend (no isolation)")
        return LocalBackend(settings)
    return backend  # stays unready; /readyz says so and sessions get sandbox_unavailable


def is_loopback(host: str) -> bool:
    """Whether a bind or Host name is loopback only: ``localhost``, 127.0.0.0/8, ``::1`` (bracketed or not).

    The one test of it: the local-backend fallback here and the server's anonymous access (server/auth.py).
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Engine:
    def __init__(
        self,
        backend: Backend,
        settings: SandboxSettings,
        hooks: EngineHooks | None = None,
        pool_size: int | None = None,
    ):
        self.backend = backend
        self.settings = settings
        self.hooks = hooks or EngineHooks()
        self.pool_size = settings.pool_size if pool_size is None else pool_size
        self._ready: deque[Sandbox] = deque()
        self._starting = 0  # all starts in progress (for status)
        self._warming = 0  # starts in progress for the pool (cold starts for a caller do not count)
        self._removing = 0  # sandboxes being removed (their containers still use the machine)
        self._live: set[Sandbox] = set()
        self._need = asyncio.Event()
        self._refill_task: asyncio.Task | None = None
        self._closed = False
        self.last_error: str | None = None
        self.cold_starts = 0
        self._change = asyncio.Event()

    # ---- life cycle

    async def start(self) -> None:
        try:
            n = await self.backend.reap_orphans()
        except Exception as exc:
            n = 0
            log.warning("could not reap orphan containers: %s", exc)
        if n:
            log.info("removed %d orphan sandbox containers", n)
            self.hooks.containers_reaped(n)
        self._refill_task = asyncio.create_task(self._refill_loop(), name="sandbox-pool-refill")
        self._need.set()

    async def close(self) -> None:
        self._closed = True
        if self._refill_task is not None:
            self._refill_task.cancel()
            try:
                await self._refill_task
            except (asyncio.CancelledError, Exception):
                pass
        live = list(self._live)
        self._ready.clear()
        await asyncio.gather(*(sb.close() for sb in live), return_exceptions=True)
        # Starts and removals that sessions began (a cold acquire, a release, a replace) finish before the backend
        # closes under them: a start that ends after close removes its sandbox (_start_one), a cancelled one undoes.
        try:
            await asyncio.wait_for(self._until(lambda: not self._removing and not self._starting), CLOSE_REMOVALS_S)
        except TimeoutError:
            log.warning("%d sandbox starts, %d removals still running at close", self._starting, self._removing)
        await self.backend.close()

    async def ready(self) -> bool:
        """Open, and the backend answers: a sandbox can be started. A short pool is not
        unready (it only makes the next acquire cold): it shows as a metric and an alert."""
        return not self._closed and await self.backend.ping()

    @property
    def pool_full(self) -> bool:
        return len(self._ready) >= self.pool_size

    def status(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "backend": self.backend.name,
            "runtime": self.backend.runtime,
            "pool_size": self.pool_size,
            "pool_free": len(self._ready),
            "starting": self._starting,
            "live": len(self._live),
            "states": counts,
            "last_error": self.last_error,
        }

    def counts(self) -> dict[str, int]:
        counts = {"warm": len(self._ready), "starting": self._starting, "in_use": 0, "removing": self._removing}
        for sb in self._live:
            if sb.state == State.READY and sb not in self._ready:
                counts["in_use"] += 1
        return counts

    # ---- sandboxes

    async def acquire(self, workspace: str | None = None) -> Sandbox:
        """A started sandbox: from the pool when one is free, otherwise cold. With ``workspace`` (a host
        directory, sandbox/workspaces.py), always cold: pool sandboxes have a tmpfs at /workspace."""
        t0 = time.perf_counter()
        if workspace is not None:
            if not getattr(self.backend, "supports_workspaces", False):
                raise SandboxUnavailable(f"the {self.backend.name} backend has no named workspaces")
            sb = await self._start_one(warm=False, workspace=workspace)
            self.cold_starts += 1
            self.hooks.sandbox_acquired("cold", time.perf_counter() - t0)
            return sb
        while self._ready:
            sb = self._ready.popleft()
            if sb.alive:
                self._need.set()
                self.hooks.sandbox_acquired("pool", time.perf_counter() - t0)
                self._changed()
                return sb
            await self._discard(sb)
        self._need.set()
        sb = await self._start_one(warm=False)
        self.cold_starts += 1
        self.hooks.sandbox_acquired("cold", time.perf_counter() - t0)
        return sb

    async def release(self, sb: Sandbox) -> None:
        """Remove a sandbox that a session is done with."""
        await self._discard(sb)

    async def replace(self, sb: Sandbox) -> Sandbox:
        """A new sandbox for one that died; the old one is removed."""
        await self._discard(sb)
        return await self.acquire(sb.workspace)

    async def _discard(self, sb: Sandbox) -> None:
        self._live.discard(sb)
        self._removing += 1
        self._changed()
        try:
            await sb.close()
        finally:
            self._removing -= 1
            self._changed()

    async def _start_one(self, warm: bool, workspace: str | None = None) -> Sandbox:
        if self._closed:
            raise SandboxUnavailable("the sandbox engine is shutting down")
        self._starting += 1
        self._warming += warm
        self._changed()
        t0 = time.perf_counter()
        try:
            sid = new_session_id(self.settings.server_id)
            sb = await (
                self.backend.start(sid, workspace=workspace)  # type: ignore[call-arg]
                if workspace
                else self.backend.start(sid)
            )
        except SandboxUnavailable as exc:
            self.last_error = str(exc)
            raise
        finally:
            self._starting -= 1
            self._warming -= warm
            self._changed()  # a close may be waiting for the starts in flight (a failed or cancelled one too)
        self.last_error = None
        sb.warm = warm
        sb.workspace = workspace
        self._live.add(sb)
        self.hooks.sandbox_started(time.perf_counter() - t0)
        self._changed()
        if self._closed:
            await self._discard(sb)
            raise SandboxUnavailable("the sandbox engine is shutting down")
        return sb

    def _changed(self) -> None:
        self.hooks.sandboxes_changed(self.counts())
        self._change.set()
        self._change = asyncio.Event()

    async def wait_filled(self) -> None:
        """Wait until the warm pool is full (for start-up and tests)."""
        await self._until(lambda: len(self._ready) >= self.pool_size)

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._change.wait()

    async def _refill_loop(self) -> None:
        backoff = 0.5
        while not self._closed:
            await self._need.wait()
            self._need.clear()
            while not self._closed and len(self._ready) + self._warming < self.pool_size:
                try:
                    sb = await self._start_one(warm=True)
                except Exception as exc:  # the refill must outlive any one failure
                    self.last_error = str(exc)
                    log.warning("pool refill failed: %r (retrying in %.1f s)", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                self._ready.append(sb)
                self._changed()
