"""Hardening, the warm pool, orphan reaping, and the same under gVisor (runsc)."""

from __future__ import annotations

import asyncio
import contextlib

import docker
import pytest
from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.engine import Engine
from support.env import NAMESPACE, sandbox_settings

pytestmark = pytest.mark.docker


async def lines_of(sb, command):
    out = []

    async def grab(ev):
        out.extend(ev.get("lines", []))

    done = await sb.request("exec", {"command": command}, grab)
    return done, "".join(out)


@contextlib.asynccontextmanager
async def started_engine(**overrides):
    settings = sandbox_settings(**overrides)
    eng = Engine(DockerBackend(settings), settings)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


def inspect(cid):
    with contextlib.closing(docker.from_env()) as client:
        return client.api.inspect_container(cid)


async def test_container_is_hardened(monkeypatch):
    monkeypatch.setenv("GROUNDLOOP_SECRET_FOR_TEST", "s3cr3t-value")
    async with started_engine(pool_size=0, memory="256m", pids_limit=128) as eng:
        sb = await eng.acquire()
        info = await asyncio.to_thread(inspect, sb.id)
        hc = info["HostConfig"]
        assert hc["NetworkMode"] == "none"
        assert hc["ReadonlyRootfs"] is True
        assert set(hc["Tmpfs"]) == {"/tmp", "/workspace"}
        assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
        assert "no-new-privileges:true" in hc["SecurityOpt"]
        assert hc["PidsLimit"] == 128
        assert hc["Memory"] == hc["MemorySwap"] == 256 << 20
        assert hc["NanoCpus"] == 1_000_000_000
        assert {u["Name"] for u in hc["Ulimits"]} == {"nofile", "fsize"}
        assert hc["LogConfig"]["Type"] == "none"
        assert not hc["Init"] and hc["AutoRemove"] is True  # the agent's own init is pid 1
        assert info["Config"]["User"] == "1000:1000"
        labels = info["Config"]["Labels"]
        assert labels["groundloop.managed"] == "true" and labels["groundloop.namespace"] == NAMESPACE
        assert labels["groundloop.session"] == sb.session_id and labels["groundloop.instance"]
        assert not any("s3cr3t" in e for e in info["Config"]["Env"])
        # the server's own variables never reach the container; the data channel's two do (sandbox/channel.py),
        # when the sandbox has the socket (the default, GROUNDLOOP_SANDBOX_CHANNEL=auto)
        own = {e.split("=")[0] for e in info["Config"]["Env"] if "GROUNDLOOP" in e}
        mounts = [(m["Type"], m["Source"], m["Target"], m["ReadOnly"]) for m in hc.get("Mounts") or ()]
        if sb.channel == "socket":
            assert own == {"GROUNDLOOP_CHANNEL", "GROUNDLOOP_CHANNEL_NONCE"}, own
            assert mounts == [("bind", eng.backend._rundirs[sb.id].path, "/run/groundloop", True)] and not hc["Binds"]
        else:
            assert own == set() and mounts == [] and not hc["Binds"], (own, mounts)

        # And from inside.
        done, out = await lines_of(sb, "id -u; ls /sys/class/net; grep CapEff /proc/self/status; env")
        assert out.splitlines()[0] == "1000"
        assert out.splitlines()[1] == "lo"  # the only interface
        assert "CapEff:\t0000000000000000" in out
        assert "s3cr3t" not in out and "GROUNDLOOP_SECRET" not in out
        done, out = await lines_of(sb, "touch /etc/x 2>&1; ls -la /var/run/docker.sock 2>&1; echo ok")
        assert "Read-only file system" in out and "No such file" in out
        # fsize: one file past the size limit is refused
        done, out = await lines_of(
            sb, f"head -c {sandbox_settings().max_file_bytes + 1} /dev/zero > /tmp/big; echo rc=$?"
        )
        assert "rc=153" in out or "File too large" in out
        await eng.release(sb)


async def test_pool_hands_out_warm_sandboxes_and_refills():
    async with started_engine(pool_size=2) as eng:
        await asyncio.wait_for(eng.wait_filled(), 180)
        assert eng.status()["pool_free"] == 2
        a = await eng.acquire()
        b = await eng.acquire()
        assert a.warm and b.warm and eng.cold_starts == 0
        c = await eng.acquire()  # the pool is empty for a moment: a cold start, not a failure
        assert (await c.request("ping"))["ok"]
        await asyncio.wait_for(eng.wait_filled(), 180)
        assert eng.status()["pool_free"] == 2
        assert await eng.ready()
        for sb in (a, b, c):
            await eng.release(sb)


async def test_close_removes_every_container():
    async with started_engine(pool_size=1) as eng:
        sb = await eng.acquire()
        ids = [sb.id]
    with contextlib.closing(docker.from_env()) as client:
        running = client.api.containers(filters={"id": ids, "status": "running"})
        assert running == []


async def test_orphans_of_a_dead_server_are_reaped():
    ns = f"{NAMESPACE}-orphans"
    settings = sandbox_settings(namespace=ns, pool_size=0)
    crashed = DockerBackend(settings)
    orphan = await crashed.start("orphan-session")
    # The "crashed" server never closes its sandbox; a new server starts.
    async with started_engine(namespace=ns, pool_size=0):
        pass
    with contextlib.closing(docker.from_env()) as client:
        left = client.api.containers(all=True, filters={"id": [orphan.id]})
        assert left == [] or left[0]["State"] in ("removing", "exited", "dead")
    await orphan.close()
    await crashed.close()


async def test_sandbox_stops_when_the_server_connection_drops():
    """stdin is "once": when the server's attach socket closes (a killed server),
    the agent exits and Docker removes the container."""
    settings = sandbox_settings(pool_size=0)
    backend = DockerBackend(settings)
    sb = await backend.start("dropped")
    sb._writer.close()  # what the kernel does for a killed server
    with contextlib.closing(docker.from_env()) as client:
        for _ in range(300):
            if not client.api.containers(filters={"id": [sb.id], "status": "running"}):
                break
            await asyncio.sleep(0.1)
        assert not client.api.containers(filters={"id": [sb.id], "status": "running"})
    await sb.close()
    await backend.close()


@pytest.mark.runsc
async def test_runsc_subset():
    async with started_engine(pool_size=0, runtime="runsc", memory="256m", pids_limit=128) as eng:
        sb = await eng.acquire()
        assert sb.runtime == "runsc"
        info = await asyncio.to_thread(inspect, sb.id)
        assert info["HostConfig"]["Runtime"] == "runsc"
        # the agent's memory guard fires at 256 - 64 - 25.6 MiB; the guest's process cap fits under it
        # ((166 - 32) / 6 = 22); the host's pids limit is far above it (docs/security.md, item 8)
        ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in info["HostConfig"]["Ulimits"]}
        assert ulimits["nproc"] == (22, 22)
        assert info["HostConfig"]["PidsLimit"] == 22 * 24 + 128
        assert (
            f"GROUNDLOOP_MEMORY_GUARD_BYTES={(256 << 20) - (64 << 20) - int((256 << 20) * 0.1)}"
            in info["Config"]["Env"]
        )
        done, text = await lines_of(
            sb, "python3 -c 'import resource; print(resource.getrlimit(resource.RLIMIT_NPROC)[0])'"
        )
        assert text.strip() == "22"
        out = []

        async def grab(ev):
            out.extend(ev.get("lines", []))

        done = await sb.request(
            "run_code", {"code": "import os\nprint(os.listdir('/sys/class/net'))\nprint(os.getuid())\n6*7"}, grab
        )
        assert done["ok"] and out == ["['lo']\n", "1000\n"]
        done, text = await lines_of(sb, "dmesg | head -1; awk '$2==\"/\"{print $4}' /proc/mounts")
        assert "gVisor" in text  # really the gVisor kernel
        assert text.splitlines()[-1].split(",")[0] == "ro"
        done = await sb.request(
            "run_code",
            {"code": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", "timeout_s": 0.5},
        )
        assert done["error"]["name"] == "Timeout" and done["state_lost"] is True
        done = await sb.request("run_code", {"code": "for i in range(100000): print(i)", "max_output_bytes": 10000})
        assert done["truncated"] is True
        await eng.release(sb)


# Each line runs in /workspace and prints a marker only when the tool succeeded with the expected output;
# a failing tool prints its own error (`ls: cannot access '/': Invalid argument` under gVisor 20221219
# before deploy/statx_shim.c).
SHELL_TOOLS = r"""
set -u
cd /workspace
mkdir -p proj/src && printf 'needle\n' > proj/src/a.txt && ln -s src/a.txt proj/link
check() { name=$1; shift; if out=$("$@" 2>&1); then printf '%s ok\n' "$name"; else printf '%s FAILED %s\n' "$name" "$out"; fi; }
check ls_root ls /
check ls_la sh -c 'ls -la proj | grep -q " link -> src/a.txt"'
check stat sh -c 'test "$(stat -c %F proj/src)" = directory'
check find sh -c 'test "$(find proj -type f)" = proj/src/a.txt'
check cp sh -c 'cp -a proj copy && cmp proj/src/a.txt copy/src/a.txt && test -L copy/link'
check tar sh -c 'tar -cf p.tar proj && mkdir x && tar -C x -xf p.tar && cmp proj/src/a.txt x/proj/src/a.txt'
check grep_r sh -c 'test "$(grep -r needle proj/src)" = "proj/src/a.txt:needle"'
check git sh -c 'cd proj && git init -q && git add -A && git status --short | grep -q "^A  src/a.txt"'
"""
TOOLS = ["ls_root", "ls_la", "stat", "find", "cp", "tar", "grep_r", "git"]


@pytest.mark.parametrize("runtime", ["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
async def test_common_shell_tools_work(runtime):
    async with started_engine(pool_size=0, runtime=runtime) as eng:
        sb = await eng.acquire()
        done, out = await lines_of(sb, SHELL_TOOLS)
        assert done["ok"] and done["exit_code"] == 0, (done, out)
        assert out.splitlines() == [f"{name} ok" for name in TOOLS], out
        await eng.release(sb)


def test_gvisor_limits_follow_the_memory_limit():
    """Under runsc only: a process cap (nproc) that fits under the memory guard's threshold, a host pids
    limit far above it, and a guard threshold that leaves the Sentry its share (docs/security.md, item 8)."""
    from groundloop.sandbox.docker_backend import hardening, memory_guard_bytes

    def limits(runtime, memory, pids=256):
        s = sandbox_settings(runtime=runtime, memory=memory, pids_limit=pids)
        hc = hardening(s)
        return {u["Name"]: u["Soft"] for u in hc["ulimits"]}.get("nproc"), hc["pids_limit"], memory_guard_bytes(s)

    assert limits("runc", "512m") == (None, 256, None)
    assert limits("runsc", "512m") == (60, 60 * 24 + 128, (512 - 64) * 2**20 - int(512 * 2**20 * 0.1))
    assert limits("runsc", "4g") == (256, 256 * 24 + 128, (4096 - 64) * 2**20 - int(4096 * 2**20 * 0.1))
    assert limits("runsc", "4g", pids=64)[0] == 64
    # a small limit still leaves the guest half, and a few processes
    assert limits("runsc", "64m") == (16, 16 * 24 + 128, 32 * 2**20)
