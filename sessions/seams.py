"""The seams of the session layer: what a session needs from the layers around it, as Protocols.

The session layer must not import ``groundloop.server``, yet it is driven by the
server's connection, settings and metrics. These Protocols name exactly what it
uses of each, so a type checker holds both sides to it and a test can pass in a
fake (tests/support/) without a server:

- ``Conn``: the attached client connection (server/connection.py ``Connection``).
- ``SessionSettings``: the knobs read here (server/settings.py ``Settings``).
- ``SessionMetrics``: the label-safe metric helpers used here (server/metrics.py
  ``Metrics``); labelled metrics are only ever updated through these methods.
- ``Assistant``: the ``assist`` runner (sessions/assist.py ``AssistRunner``).

Attributes are read-only properties so that frozen dataclasses satisfy them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from groundloop.sandbox.settings import SandboxSettings

from .assist import Emit, Execute


class Conn(Protocol):
    """A client connection a session is attached to."""

    async def close(self, code: int, reason: str = "") -> None: ...

    async def kick_for_takeover(self) -> None: ...


class SessionSettings(Protocol):
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def max_inflight(self) -> int: ...
    @property
    def max_sessions_per_user(self) -> int: ...
    @property
    def max_iterations(self) -> int: ...
    @property
    def rate_per_s(self) -> float: ...
    @property
    def rate_burst(self) -> int: ...
    @property
    def resume_grace_s(self) -> float: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def replay_frames(self) -> int: ...
    @property
    def replay_bytes(self) -> int: ...
    @property
    def send_queue_frames(self) -> int: ...

    @property
    def send_queue_bytes(self) -> int: ...
    @property
    def validate_concurrency(self) -> int: ...
    @property
    def sandbox(self) -> SandboxSettings: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Gauge(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...


class SessionMetrics(Protocol):
    """The metrics a session and its manager update (unlabelled ones directly, the rest by helper)."""

    @property
    def inflight(self) -> _Gauge: ...
    @property
    def sessions(self) -> _Gauge: ...
    @property
    def truncations(self) -> _Counter: ...

    def error(self, code: str) -> None: ...

    def request_done(self, type_: str, outcome: str, seconds: float) -> None: ...

    def request_answered(self, type_: str, outcome: str) -> None: ...

    def execution_done(
        self, kind: str, language: str | None, outcome: str, seconds: float, truncated: bool = False
    ) -> None: ...

    def first_output_seen(self, kind: str, seconds: float) -> None: ...

    def frames_replayed(self, n: int) -> None: ...


class Assistant(Protocol):
    """Runs one ``assist`` request (see sessions/assist.py for the contract)."""

    @property
    def available(self) -> bool: ...

    async def run(
        self,
        *,
        rid: Any,
        prompt: str,
        language: str,
        max_iterations: int | None,
        context: str | None,
        emit: Emit,
        execute: Execute,
        scope: str = "",
    ) -> Mapping[str, Any]: ...
