"""Shared fixtures and hooks: real Docker, real sockets. What tests import lives in tests/support/.

Docker tests carry the ``docker`` marker. Without a reachable engine they are
skipped, unless GROUNDLOOP_REQUIRE_DOCKER=1 (CI), where they fail instead.
Docker is asked only when a selected test carries the marker, so a run of the
unit tier (or of ``-m "not docker"``) never touches an engine.
Every test run uses its own label namespace, and whatever containers of that
namespace are left at the end fail the run.
"""

from __future__ import annotations

import contextlib

import pytest
from groundloop.sandbox.settings import SandboxSettings
from support.collect import Collector
from support.docker_probe import docker_state, runsc_available
from support.env import NAMESPACE, REQUIRE_DOCKER, sandbox_settings
from support.servers import run_server

# Set by pytest_collection_modifyitems: whether any selected test needs Docker (then the probe ran).
_uses_docker = False


# trylast: after -m and -k have deselected, so only the tests that will run decide whether Docker is asked.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    global _uses_docker
    _uses_docker = any("docker" in item.keywords for item in items)
    if not _uses_docker:
        return
    reason = docker_state()
    for item in items:
        if "docker" in item.keywords and reason and not REQUIRE_DOCKER:
            item.add_marker(pytest.mark.skip(reason=reason))
        if "runsc" in item.keywords and not runsc_available():
            if REQUIRE_DOCKER:
                continue  # runs and fails: CI must have runsc
            item.add_marker(pytest.mark.skip(reason="runsc is not registered with Docker"))


@pytest.fixture(scope="session", autouse=True)
def _docker_required_check():
    if not _uses_docker:
        yield
        return
    reason = docker_state()
    if REQUIRE_DOCKER and reason:
        pytest.fail(f"GROUNDLOOP_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    yield
    if reason:
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


@pytest.fixture
def collect():
    return Collector


# The ``server`` fixture: a real server (support/servers.py) with tokens ``tok1:alice`` and
# ``tok2:bob`` and a warm pool of one. Clients: support/wsclient.py.
@pytest.fixture
async def server():
    async with run_server() as srv:
        yield srv


@pytest.fixture
async def fake():
    """A local stand-in of the Anthropic Messages streaming API (support/fake_anthropic.py)."""
    from support.fake_anthropic import FakeAnthropic

    async with FakeAnthropic() as f:
        yield f
