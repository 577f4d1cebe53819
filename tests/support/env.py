"""This test run's identity and settings: its container label namespace, the sandbox image, and the
sandbox and server settings every Docker test starts from (the environment ignored where it matters).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Any

from groundloop.sandbox.settings import SandboxSettings, load

# One namespace per run (this module is imported once, as ``support.env``): the leak check at the end
# of the session looks for containers of this namespace only, so parallel runs never see each other's.
NAMESPACE = f"test-{secrets.token_hex(4)}"
REQUIRE_DOCKER = os.environ.get("GROUNDLOOP_REQUIRE_DOCKER") == "1"
IMAGE = os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest")
TEST_TOKENS = ["tok1:alice", "tok2:bob"]


def sandbox_settings(**overrides: Any) -> SandboxSettings:
    """Sandbox settings for tests: this run's namespace, small pool, env ignored where it matters."""
    base = load(SandboxSettings)
    values: dict[str, Any] = {"namespace": NAMESPACE, "image": IMAGE, "pool_size": 1}
    values.update(overrides)
    return dataclasses.replace(base, **values)


def server_settings(*, sandbox: SandboxSettings | None = None, **overrides: Any):
    """Server settings for tests: environment ignored, this run's sandbox namespace."""
    from groundloop.server.settings import Settings

    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "tokens": list(TEST_TOKENS),
        "sandbox": sandbox if sandbox is not None else sandbox_settings(pool_size=1),
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)
