"""Shared fixtures: real Docker, real sockets.

Docker tests carry the ``docker`` marker. Without a reachable engine they are
skipped, unless GROUNDLOOP_REQUIRE_DOCKER=1 (CI), where they fail instead.
Every test run uses its own label namespace, and whatever containers of that
namespace are left at the end fail the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets

import pytest
from groundloop.sandbox.settings import SandboxSettings, load

NAMESPACE = f"test-{secrets.token_hex(4)}"
REQUIRE_DOCKER = os.environ.get("GROUNDLOOP_REQUIRE_DOCKER") == "1"
IMAGE = os.environ.get("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest")


def _docker_state() -> str | None:
    """None when Docker and the sandbox image are usable, else the reason."""
    try:
        import docker

        client = docker.from_env(timeout=10)
    except Exception as exc:
        return f"Docker is not reachable: {exc}"
    with contextlib.closing(client):
        try:
            client.ping()
        except Exception as exc:
            return f"Docker is not reachable: {exc}"
        try:
            client.images.get(IMAGE)
        except Exception:
            return f"the sandbox image {IMAGE} is missing (run: groundloop image build)"
    return None


_DOCKER_REASON = _docker_state()


def _runsc_available() -> bool:
    if _DOCKER_REASON:
        return False
    import docker

    with contextlib.closing(docker.from_env()) as client:
        return "runsc" in (client.info().get("Runtimes") or {})


RUNSC = _runsc_available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "docker" in item.keywords and _DOCKER_REASON and not REQUIRE_DOCKER:
            item.add_marker(pytest.mark.skip(reason=_DOCKER_REASON))
        if "runsc" in item.keywords and not RUNSC:
            if REQUIRE_DOCKER:
                continue  # runs and fails: CI must have runsc
            item.add_marker(pytest.mark.skip(reason="runsc is not registered with Docker"))


@pytest.fixture(scope="session", autouse=True)
def _docker_required_check():
    if REQUIRE_DOCKER and _DOCKER_REASON:
        pytest.fail(f"GROUNDLOOP_REQUIRE_DOCKER=1 but {_DOCKER_REASON}", pytrace=False)
    yield
    if _DOCKER_REASON:
        return
    import docker

    with contextlib.closing(docker.from_env()) as client:
        left = client.api.containers(all=True, filters={"label": [f"groundloop.namespace={NAMESPACE}"]})
        for c in left:
            try:
                client.api.remove_container(c["Id"], force=True)
            except Exception:
                pass
    # Containers of a stopped test are removed by auto_remove asynchronously:
    # only those still running count as leaked.
    leaked = [c for c in left if c.get("State") == "running"]
    assert not leaked, f"{len(leaked)} sandbox containers leaked by the tests"


def sandbox_settings(**overrides) -> SandboxSettings:
    """Sandbox settings for tests: this run's namespace, small pool, env ignored where it matters."""
    base = load(SandboxSettings)
    values = {"namespace": NAMESPACE, "image": IMAGE, "pool_size": 1}
    values.update(overrides)
    return dataclasses.replace(base, **values)


@pytest.fixture
def sb_settings() -> SandboxSettings:
    return sandbox_settings()


@pytest.fixture
async def engine(sb_settings):
    """A started docker engine with a pool of one."""
    from groundloop.sandbox.docker_backend import DockerBackend
    from groundloop.sandbox.engine import Engine

    eng = Engine(DockerBackend(sb_settings), sb_settings)
    await eng.start()
    yield eng
    await eng.close()


@pytest.fixture
async def sandbox(engine):
    sb = await engine.acquire()
    yield sb
    await engine.release(sb)


class Collector:
    """Collects a request's streamed events."""

    def __init__(self):
        self.events: list[dict] = []

    async def __call__(self, ev: dict) -> None:
        self.events.append(ev)

    def text(self, stream: str = "stdout") -> str:
        return "".join(
            line for ev in self.events if ev.get("ev") == "out" and ev["s"] == stream for line in ev["lines"]
        )

    def lines(self, stream: str = "stdout") -> list[str]:
        return [line for ev in self.events if ev.get("ev") == "out" and ev["s"] == stream for line in ev["lines"]]

    def results(self) -> list[dict]:
        return [ev for ev in self.events if ev.get("ev") == "result"]


@pytest.fixture
def collect():
    return Collector


# ---------------------------------------------------------------------------
# Server fixtures (owned by the server/sessions engineer).
#
# ``run_server(settings, **create_app_kwargs)`` starts a real uvicorn on
# 127.0.0.1 with a free port, in the test's event loop, and yields a
# ``RunningServer`` (.url ws://.../v1/ws, .http http://..., .settings, .app,
# .state = app.state.groundloop). The ``server`` fixture is one with tokens
# ``tok1:alice`` and ``tok2:bob`` and a warm pool of one. Clients:
# tests/wsclient.py.


TEST_TOKENS = ["tok1:alice", "tok2:bob"]


def server_settings(*, sandbox=None, **overrides):
    """Server settings for tests: environment ignored, this run's sandbox namespace."""
    from groundloop.server.settings import Settings

    values = {
        "host": "127.0.0.1",
        "port": 0,
        "tokens": list(TEST_TOKENS),
        "sandbox": sandbox if sandbox is not None else sandbox_settings(pool_size=1),
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


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
async def run_server(settings=None, **create_app_kwargs):
    from groundloop.server.app import create_app, serve_in_process

    settings = settings if settings is not None else server_settings()
    app = create_app(settings, **create_app_kwargs)
    async with serve_in_process(app, settings) as uv:
        yield RunningServer(app, settings, uv.groundloop_port, uv)


@pytest.fixture
async def server():
    async with run_server() as srv:
        yield srv


@pytest.fixture
async def fake():
    """A local stand-in of the Anthropic Messages streaming API (tests/fake_anthropic.py)."""
    from fake_anthropic import FakeAnthropic

    async with FakeAnthropic() as f:
        yield f


def rss() -> int:
    """This process's resident memory, in bytes (the in-process server's, in the tests that run one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
