"""Named workspaces over the real WebSocket and HTTP, under runc and runsc (docs/workspaces.md):
files that outlive the session, an idle close and a server restart; the per-user quota as a
hard limit; snapshot and restore; listing and deleting; one user never reaching another's."""

from __future__ import annotations

import asyncio
import contextlib
import os

import httpx
import pytest
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.docker

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]


def settings(root, runtime="runc", quota="64m", mode="auto", **overrides):
    sb = sandbox_settings(
        pool_size=0, runtime=runtime, workspace_dir=str(root), workspace_quota=quota, workspace_quota_mode=mode
    )
    return server_settings(sandbox=sb, **overrides)


@contextlib.asynccontextmanager
async def open_ws(server, name, token="tok1"):
    async with await WSClient.connect(f"{server.url}?workspace={name}", token=token) as c:
        yield c


async def run(c: WSClient, code: str) -> str:
    frames = await c.request("run_code", code=code)
    assert frames[-1]["ok"], frames[-1]
    return c.text(frames)


async def closed_code(c: WSClient) -> tuple[int, list[dict]]:
    """Read until the server closes: the close code, and the frames read."""
    frames = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            frames.append(await c.recv())
    return (info.value.rcvd.code if info.value.rcvd else 1006), frames


async def refused(server, query: str, token="tok1") -> tuple[int, list[dict]]:
    c = await WSClient.connect(f"{server.url}?{query}", token=token, expect_ready=False)
    async with c:
        return await closed_code(c)


async def sessions_gone(server) -> None:
    while server.state.manager.sessions:
        await asyncio.sleep(0.05)


def http(server, token="tok1") -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def mounts() -> str:
    with open("/proc/self/mounts") as f:
        return f.read()


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_files_outlive_the_session_an_idle_close_and_a_server_restart(tmp_path, runtime):
    s = settings(tmp_path, runtime, idle_timeout_s=1.0, resume_grace_s=0.5)
    async with run_server(s) as server:
        async with open_ws(server, "w") as c:
            assert c.ready["sandbox"]["workspace"] == "w" and c.ready["sandbox"]["warm"] is False
            await run(c, "import os\nopen('keep.txt', 'w').write('kept ' + str(os.getuid()))\n")
        async with open_ws(server, "w") as c:
            assert await run(c, "print(open('keep.txt').read())") == "kept 1000\n"
            await run(c, "open('more.txt', 'w').write('after')")
            # nothing in flight: the session is closed as idle
            code, _ = await closed_code(c)
            assert code == 4410
        await sessions_gone(server)
        async with open_ws(server, "w") as c:
            assert await run(c, "print(open('more.txt').read())") == "after\n"
    # the server is gone, its containers removed and the user's filesystem unmounted
    assert str(tmp_path) not in mounts()
    async with run_server(settings(tmp_path, runtime)) as server:
        async with http(server) as h:  # listed before any session opens it again
            assert [w["name"] for w in (await h.get("/v1/workspaces")).json()["workspaces"]] == ["w"]
        async with open_ws(server, "w") as c:
            assert await run(c, "print(sorted(os.listdir('.')) if (os := __import__('os')) else 0)") == (
                "['keep.txt', 'more.txt']\n"
            )


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_snapshot_and_restore_round_trip(tmp_path, runtime):
    async with run_server(settings(tmp_path, runtime)) as server, open_ws(server, "proj") as c:
        await run(c, "import os\nos.makedirs('d', exist_ok=True)\nopen('d/a.txt', 'w').write('v1')")
        done = await c.call("snapshot", snapshot="first")
        assert done["ok"] and done["snapshot"] == "first" and done["workspace"] == "proj" and done["size"] > 0
        await run(c, "open('d/a.txt', 'w').write('v2')\nopen('b.txt', 'w').write('new')")
        auto = await c.call("snapshot")
        assert auto["ok"] and auto["snapshot"].startswith("snap-")
        listed = await c.call("list_snapshots")
        assert sorted(s["id"] for s in listed["snapshots"]) == sorted(["first", auto["snapshot"]])

        done = await c.call("restore", snapshot="first")
        assert done["ok"], done
        assert await run(c, "print(open('d/a.txt').read(), os.path.exists('b.txt'))") == "v1 False\n"
        done = await c.call("restore", snapshot=auto["snapshot"])
        assert await run(c, "print(open('d/a.txt').read(), open('b.txt').read())") == "v2 new\n"

        missing = await c.call("restore", snapshot="nope")
        assert not missing["ok"] and missing["error"]["name"] == "NotFound"
        bad = await c.call("snapshot", snapshot="../escape")
        assert not bad["ok"] and bad["error"]["name"] == "BadRequest"


async def test_snapshot_needs_a_workspace_session(tmp_path):
    async with run_server(settings(tmp_path)) as server:
        async with await WSClient.connect(server.url, token="tok1") as c:
            assert "workspace" not in c.ready["sandbox"]
            done = await c.call("snapshot")
            assert not done["ok"] and done["error"]["name"] == "NoWorkspace"


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_quota_is_a_hard_limit_in_the_sandbox(tmp_path, runtime):
    async with run_server(settings(tmp_path, runtime, quota="32m")) as server:
        assert server.state.manager.workspaces.store.mode == "loop"
        async with open_ws(server, "big") as c:
            # files of 15 MiB (the fsize ulimit is 16 MiB) until the disk is full
            fill = "for i in 1 2 3 4; do dd if=/dev/zero of=fill$i bs=1M count=15 || exit 1; done 2>&1"
            done = (await c.request("exec", command=fill))[-1]
            out = c.text(c.of(done["id"]))
            assert done["exit_code"] != 0 and "No space left" in out, out
            code = "import os\nprint(sum(os.path.getsize(f) for f in os.listdir('.')))"
            assert 16 << 20 < int(await run(c, code)) <= 32 << 20
            # a snapshot counts against the same quota: there is no room for one
            full = await c.call("snapshot", snapshot="s")
            assert not full["ok"] and full["error"]["name"] == "QuotaExceeded", full
            # another workspace of the same user shares the quota
            async with open_ws(server, "other") as c2:
                done = (await c2.request("exec", command="dd if=/dev/zero of=f bs=1M count=1"))[-1]
                assert done["exit_code"] != 0
            await run(c, "for f in os.listdir('.'): os.remove(f)")
            ok = await c.call("snapshot", snapshot="s")
            assert ok["ok"], ok
        async with http(server) as h:
            listing = (await h.get("/v1/workspaces")).json()
        assert listing["mode"] == "loop" and listing["quota"] == 32 << 20 and listing["used"] < 16 << 20
        assert [w["name"] for w in listing["workspaces"]] == ["big", "other"]


async def test_measured_mode_refuses_a_new_workspace_over_the_quota(tmp_path):
    async with run_server(settings(tmp_path, quota="1m", mode="measured")) as server:
        async with open_ws(server, "a") as c:
            await run(c, "open('f', 'wb').write(b'x' * (2 << 20))")
            refused_snap = await c.call("snapshot")
            assert refused_snap["error"]["name"] == "QuotaExceeded"
        code, frames = await refused(server, "workspace=b")
        assert code == 4400 and frames[0]["code"] == "quota_exceeded"
        async with open_ws(server, "a") as c:  # an existing one still opens: its owner can make room
            await run(c, "os = __import__('os'); os.remove('f')")
            assert (await c.call("snapshot"))["ok"]


async def test_users_never_reach_each_others_workspaces(tmp_path):
    s = settings(tmp_path, resume_grace_s=0.2)
    async with run_server(s) as server:
        async with open_ws(server, "w", token="tok1") as alice:
            await run(alice, "open('secret.txt', 'w').write('alice only')")
            await alice.call("snapshot", snapshot="s1")
        async with open_ws(server, "w", token="tok2") as bob:
            # the same name is bob's own, empty workspace
            assert await run(bob, "import os\nprint(os.listdir('.'))") == "[]\n"
            assert not (await bob.call("restore", snapshot="s1"))["ok"]
            assert (await bob.call("list_snapshots"))["snapshots"] == []
        await sessions_gone(server)
        async with http(server, "tok2") as h:
            assert [w["name"] for w in (await h.get("/v1/workspaces")).json()["workspaces"]] == ["w"]
            assert (await h.delete("/v1/workspaces/w")).status_code == 200
            assert (await h.delete("/v1/workspaces/w")).status_code == 404
            assert (await h.delete("/v1/workspaces/w/snapshots/s1")).status_code == 404
            assert (await h.get("/v1/workspaces")).json()["workspaces"] == []
        async with http(server, "tok1") as h:
            mine = (await h.get("/v1/workspaces")).json()["workspaces"]
            assert [(w["name"], [x["id"] for x in w["snapshots"]]) for w in mine] == [("w", ["s1"])]
        async with httpx.AsyncClient(base_url=server.http) as h:
            assert (await h.get("/v1/workspaces")).status_code == 401
        async with open_ws(server, "w", token="tok1") as alice:
            assert await run(alice, "print(open('secret.txt').read())") == "alice only\n"


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "x" * 65, "%00", "-x"])
async def test_bad_names_are_refused(tmp_path, name):
    async with run_server(settings(tmp_path)) as server:
        code, frames = await refused(server, f"workspace={name}")
        assert code == 4400 and frames[0]["code"] == "bad_request"
        async with http(server) as h:
            r = await h.delete(f"/v1/workspaces/{name}")
            assert r.status_code in (400, 404, 405)
    assert os.listdir(tmp_path) == []  # refused before anything was made


async def test_a_workspace_in_use_is_not_deleted(tmp_path):
    async with run_server(settings(tmp_path, resume_grace_s=0.2)) as server:
        async with open_ws(server, "w") as c, http(server) as h:
            await run(c, "open('f', 'w').write('x')")
            r = await h.delete("/v1/workspaces/w")
            assert r.status_code == 409 and r.json()["error"]["code"] == "in_use"
            assert (await h.get("/v1/workspaces")).json()["workspaces"][0]["in_use"] is True
        await sessions_gone(server)
        async with http(server) as h:
            assert (await h.delete("/v1/workspaces/w")).status_code == 200
            assert (await h.get("/v1/workspaces")).json() == {
                "mode": "loop",
                "quota": 64 << 20,
                "used": 0,
                "workspaces": [],
            }
        # the last workspace gone: the loop filesystem is unmounted and its image deleted
        assert str(tmp_path) not in mounts()
        assert not list(tmp_path.glob("*/fs.img"))


async def test_without_a_workspace_dir_there_are_none(tmp_path):
    async with run_server(server_settings(sandbox=sandbox_settings(pool_size=0))) as server:
        code, frames = await refused(server, "workspace=w")
        assert (
            code == 4400 and frames[0]["code"] == "bad_request" and "GROUNDLOOP_WORKSPACE_DIR" in frames[0]["message"]
        )
        async with http(server) as h:
            assert (await h.get("/v1/workspaces")).status_code == 404


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_lost_sandbox_is_replaced_on_the_same_workspace(tmp_path, runtime):
    async with run_server(settings(tmp_path, runtime)) as server, open_ws(server, "w") as c:
        await run(c, "x = 1\nopen('f.txt', 'w').write('still here')")
        session = server.state.manager.sessions[c.session_id]
        await server.state.engine.backend.kill(session.sb)
        while True:
            frame = await c.recv()
            if frame["type"] == "sandbox_replaced":
                break
        assert frame["sandbox"]["workspace"] == "w"
        assert await run(c, "print(open('f.txt').read(), 'x' in globals())") == "still here False\n"


async def test_a_store_that_cannot_be_written_is_an_internal_error_not_a_crash(tmp_path):
    root = tmp_path / "not-a-directory"
    root.write_text("")
    async with run_server(settings(root)) as server:
        code, frames = await refused(server, "workspace=w")
        assert code == 1011 and frames[0]["code"] == "internal" and "store failed" in frames[0]["message"]
        async with await WSClient.connect(server.url, token="tok1") as c:  # the server goes on
            assert await run(c, "print('fine')") == "fine\n"
