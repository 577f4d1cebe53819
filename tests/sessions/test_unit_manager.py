"""The session manager without Docker: creation limits, lookup, reaping, validation limits, shutdown."""

from __future__ import annotations

import time

import orjson
import pytest
from groundloop.sandbox.base import SandboxUnavailable
from groundloop.sandbox.engine import is_loopback
from groundloop.server.auth import check_startup
from groundloop.sessions.errors import LimitError
from groundloop.sessions.session import State
from support.units import FakeConn, harness, settings


async def test_create_find_and_the_per_user_cap():
    async with harness(max_sessions_per_user=2) as h:
        a1 = await h.manager.create("alice")
        a2 = await h.manager.create("alice")
        with pytest.raises(LimitError) as info:
            await h.manager.create("alice")
        assert info.value.code == "busy"
        b1 = await h.manager.create("bob")  # another user's cap is their own
        assert h.manager.find("alice", a1.id) is a1
        assert h.manager.find("bob", a1.id) is None  # another user's id is not found, like an unknown one
        assert h.manager.find("alice", "nope") is None
        await h.manager.close_session(a2, "test")
        assert h.manager.find("alice", a2.id) is None
        assert await h.manager.create("alice")  # room again
        assert {s.user for s in h.manager.sessions.values()} == {"alice", "bob"} and b1.live
        assert "groundloop_sessions 3.0" in h.metrics.exposition().decode()


async def test_a_sandbox_that_cannot_start_fails_the_create():
    async with harness() as h:
        h.backend.fail_starts = 1
        with pytest.raises(SandboxUnavailable):
            await h.manager.create("alice")
        assert not h.manager.sessions and not h.manager._pending
        assert await h.manager.create("alice")


async def test_reaping_detached_past_grace_and_idle():
    async with harness(resume_grace_s=5.0, idle_timeout_s=50.0) as h:
        detached = await h.manager.create("alice")
        conn = FakeConn()
        await detached.attach(conn)
        detached.detach(conn)
        idle = await h.manager.create("alice")
        await idle.attach(FakeConn())
        busy = await h.manager.create("alice")
        busy_conn = FakeConn()
        await busy.attach(busy_conn)
        await busy.handle_frame(orjson.dumps({"type": "run_code", "id": 1, "code": "gate:never"}))
        now = time.monotonic()
        assert await h.manager.reap(now) == 0
        assert await h.manager.reap(now + 6) == 1  # past the grace
        assert detached.state is State.CLOSED and detached.id not in h.manager.sessions
        assert await h.manager.reap(now + 51) == 1  # idle; the busy one has a request in flight
        assert idle.state is State.CLOSED and busy.live
        assert busy_conn.closed is None


async def test_validation_limits():
    async with harness(validate_concurrency=1, max_sessions_per_user=2, rate_burst=1, rate_per_s=0.001) as h:
        await h.manager.create("alice")
        async with h.manager.validation("alice"):
            with pytest.raises(LimitError, match="validations are running"):
                async with h.manager.validation("bob"):
                    pass
            with pytest.raises(LimitError, match="user has 2 sessions"):
                await h.manager.create("alice")  # the validation holds one of alice's two
        with pytest.raises(LimitError) as info:
            async with h.manager.validation("alice"):  # alice's burst of one is spent
                pass
        assert info.value.code == "rate_limited"


async def test_shutdown_closes_every_session_with_1012():
    async with harness() as h:
        conns = [FakeConn() for _ in range(3)]
        for c in conns:
            s = await h.manager.create("alice")
            await s.attach(c)
        await h.manager.close()
        assert [c.closed[0] for c in conns] == [1012, 1012, 1012]
        assert not h.manager.sessions and h.backend.closed == 3
        with pytest.raises(LimitError):
            await h.manager.create("alice")


def test_one_loopback_test():
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("", "0.0.0.0", "::", "[::]", "10.0.0.1", "example.com"):
        assert not is_loopback(host), host
    check_startup(settings(tokens=[], host="[::1]"))  # anonymous on loopback: allowed
    with pytest.raises(ValueError, match="refusing to bind"):
        check_startup(settings(tokens=[], host="0.0.0.0"))
