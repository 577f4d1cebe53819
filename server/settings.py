"""The one typed settings object of groundloop.

Every knob is a ``GROUNDLOOP_*`` environment variable (see the README's
configuration table, generated from this file by ``groundloop config``); the
anthropic SDK reads its own ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from groundloop.sandbox.settings import SandboxSettings, SettingsError, env, load


@dataclass(frozen=True)
class Settings:
    host: str = env("GROUNDLOOP_HOST", "127.0.0.1", "bind address")
    port: int = env("GROUNDLOOP_PORT", 8000, "bind port")
    tokens: list = env("GROUNDLOOP_TOKENS", [], "`token:user` pairs, comma-separated")
    tokens_file: str = env("GROUNDLOOP_TOKENS_FILE", "", "a file of `token:user` lines")
    allowed_origins: list = env(
        "GROUNDLOOP_ALLOWED_ORIGINS", [], "browser origins allowed to connect (default: the server's own)"
    )
    resume_grace_s: float = env(
        "GROUNDLOOP_RESUME_GRACE_S", 60.0, "how long a disconnected session waits for its client"
    )
    idle_timeout_s: float = env("GROUNDLOOP_IDLE_TIMEOUT_S", 600.0, "a session with no request for this long is closed")
    max_sessions_per_user: int = env("GROUNDLOOP_MAX_SESSIONS_PER_USER", 8, "live sessions per user")
    max_inflight: int = env("GROUNDLOOP_MAX_INFLIGHT", 32, "requests in flight per session")
    rate_per_s: float = env("GROUNDLOOP_RATE_PER_S", 100.0, "request rate per user (token bucket refill)")
    rate_burst: int = env("GROUNDLOOP_RATE_BURST", 200, "request burst per user (token bucket size)")
    max_message_bytes: int = env("GROUNDLOOP_MAX_MESSAGE_BYTES", 32 << 20, "largest client frame")
    replay_frames: int = env("GROUNDLOOP_REPLAY_FRAMES", 4096, "frames kept per session for resume")
    replay_bytes: int = env("GROUNDLOOP_REPLAY_BYTES", 16 << 20, "bytes kept per session for resume")
    send_queue_frames: int = env(
        "GROUNDLOOP_SEND_QUEUE_FRAMES", 1024, "unsent frames per session before the sandbox stream is paused"
    )
    send_queue_bytes: int = env(
        "GROUNDLOOP_SEND_QUEUE_BYTES",
        16 << 20,
        "unsent bytes per session before the sandbox stream is paused and the client's frames are no longer read",
    )
    send_timeout_s: float = env(
        "GROUNDLOOP_SEND_TIMEOUT_S",
        30.0,
        "a client that accepts nothing for this long is disconnected (the session stays resumable)",
    )
    header_timeout_s: float = env(
        "GROUNDLOOP_HEADER_TIMEOUT_S", 10.0, "time a connection has to send each request head (else 408, closed)"
    )
    max_pending_connections: int = env(
        "GROUNDLOOP_MAX_PENDING_CONNECTIONS",
        256,
        "connections still sending a request head, server-wide; more are answered 503 and closed",
    )
    max_header_bytes: int = env(
        "GROUNDLOOP_MAX_HEADER_BYTES",
        16 << 10,
        "largest request head (431 over it; a WebSocket upgrade's header lines are also held to 8 KiB each)",
    )
    model: str = env("GROUNDLOOP_MODEL", "claude-sonnet-4-6", "Anthropic model for `assist`")
    max_tokens: int = env("GROUNDLOOP_MAX_TOKENS", 4096, "max_tokens per model call")
    validate_concurrency: int = env(
        "GROUNDLOOP_VALIDATE_CONCURRENCY",
        2,
        "validate-code runs at once, server-wide (each holds a pristine sandbox; one user may hold half, at least one)",
    )
    max_iterations: int = env("GROUNDLOOP_MAX_ITERATIONS", 5, "cap on a client's `max_iterations`")
    policy_patterns: list = env(
        "GROUNDLOOP_POLICY_PATTERNS", [], "regular expressions that `assist` refuses to run (off when empty)"
    )
    cache_entries: int = env("GROUNDLOOP_CACHE_ENTRIES", 512, "validate-code/assist result cache size")
    cache_ttl_s: float = env("GROUNDLOOP_CACHE_TTL_S", 600.0, "validate-code/assist result cache TTL")
    drain_s: float = env(
        "GROUNDLOOP_DRAIN_S",
        30.0,
        "on SIGTERM, how long running requests may finish before the sessions close (docs/deploy.md)",
    )
    metrics_port: int = env(
        "GROUNDLOOP_METRICS_PORT",
        0,
        "serve /metrics on this port (same address) instead of the main one, which then answers 404 for it "
        "(0: on the main port)",
    )
    anthropic_api_key_file: str = env(
        "GROUNDLOOP_ANTHROPIC_API_KEY_FILE",
        "",
        "a file holding the Anthropic API key (a mounted secret), instead of ANTHROPIC_API_KEY",
    )
    loop: str = env("GROUNDLOOP_LOOP", "auto", "event loop: `auto` (uvloop when installed), `uvloop` or `asyncio`")
    log_level: str = env("GROUNDLOOP_LOG_LEVEL", "info", "log level")
    static_dir: str = env("GROUNDLOOP_STATIC_DIR", "", "serve the page from here instead of static/")
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        return load(cls, environ, **overrides)


__all__ = ["Settings", "SandboxSettings", "SettingsError"]
