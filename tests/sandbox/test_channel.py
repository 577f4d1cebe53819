"""The direct data channel (sandbox/channel.py, sandbox/rundir.py) in real sandboxes, under runc and runsc:
the socket carries the frames, the attach stream stays the lifeline, and the fallback to it works."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import docker
import pytest
from groundloop.sandbox import channel as channel_mod
from groundloop.sandbox import rundir
from groundloop.sandbox.base import SandboxUnavailable
from groundloop.sandbox.docker_backend import DockerBackend
from support.collect import Collector as Events
from support.env import NAMESPACE, sandbox_settings

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
DEADLINE = 60.0


@contextlib.asynccontextmanager
async def backend_of(tmp_path, **overrides):
    overrides.setdefault("channel", "auto")  # the default, said here: a run with GROUNDLOOP_SANDBOX_CHANNEL=attach
    settings = sandbox_settings(pool_size=0, run_dir=str(tmp_path / "run"), **overrides)
    backend = DockerBackend(settings)
    try:
        yield backend
    finally:
        await backend.reap_all()
        await backend.close()


def running(cid: str) -> bool:
    with contextlib.closing(docker.from_env()) as client:
        return bool(client.api.containers(filters={"id": [cid], "status": "running"}))


async def wait_gone(cid: str) -> bool:
    for _ in range(300):
        if not await asyncio.to_thread(running, cid):
            return True
        await asyncio.sleep(0.1)
    return False


INTERLEAVED = """
import sys
for i in range(300):
    print(f"out {i}")
    print(f"err {i}", file=sys.stderr)
    if i % 50 == 0:
        sys.stdout.flush(); sys.stderr.flush()
print("x" * 100000)
'end'
"""


@pytest.mark.docker
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_sandbox_uses_the_socket_and_everything_runs_on_it(tmp_path, runtime):
    async with backend_of(tmp_path, runtime=runtime) as backend:
        sb = await backend.start("channel")
        try:
            assert sb.channel == "socket" and sb.hello["channel"] == "socket"
            # Its host directory: 0700, the sandbox's uid, nothing in it once the agent is connected (the socket
            # is unlinked when accepted), mounted read-only.
            path = backend._rundirs[sb.id].path
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (1000, 1000)
            assert os.listdir(path) == []
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            ev = Events()
            done = await sb.request(
                "exec",
                {"command": "ls -A /run/groundloop; touch /run/groundloop/x 2>&1; echo rc=$?"},
                ev,
                deadline_s=DEADLINE,
            )
            assert done["ok"] and "Read-only file system" in ev.text() and "rc=1" in ev.text(), ev.text()
            assert os.listdir(path) == []

            # Output of both streams, in order within each, before the result, before the done.
            ev = Events()
            done = await sb.request("run_code", {"code": INTERLEAVED}, ev, deadline_s=DEADLINE)
            assert done["ok"], done
            out = ev.text("stdout").splitlines()
            assert out[:300] == [f"out {i}" for i in range(300)] and out[300] == "x" * 100000
            assert ev.text("stderr").splitlines() == [f"err {i}" for i in range(300)]
            assert ev.results()[-1]["data"]["text/plain"] == "'end'"
            assert ev.events[-1]["ev"] == "result"

            # Many requests at once, each with its own done, and a cancel on the socket.
            slow = sb.submit("run_code", {"code": "import time\ntime.sleep(30)"}, None, rid="slow")
            pings = await asyncio.gather(*(sb.request("ping", deadline_s=DEADLINE) for _ in range(20)))
            assert all(p["ok"] and p["pong"] for p in pings)
            await asyncio.sleep(0.3)
            sb.cancel("slow")
            done = await asyncio.wait_for(slow, DEADLINE)
            assert not done["ok"] and done["error"]["name"] == "Cancelled", done
        finally:
            await sb.close()
        assert not os.path.exists(path)  # removed with the sandbox
        assert await wait_gone(sb.id)


@pytest.mark.docker
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_attach_stream_when_asked_for(tmp_path, runtime):
    async with backend_of(tmp_path, runtime=runtime, channel="attach") as backend:
        sb = await backend.start("attach")
        try:
            assert sb.channel == "attach" and sb.hello["channel"] == "attach"
            assert backend._rundirs == {}
            ev = Events()
            done = await sb.request("run_code", {"code": INTERLEAVED}, ev, deadline_s=DEADLINE)
            assert done["ok"] and ev.text("stdout").splitlines()[:300] == [f"out {i}" for i in range(300)]
            ev = Events()
            done = await sb.request("exec", {"command": "ls /run/groundloop 2>&1; true"}, ev, deadline_s=DEADLINE)
            assert "No such file" in ev.text()
        finally:
            await sb.close()


@pytest.mark.docker
async def test_an_agent_that_cannot_reach_the_socket_falls_back_to_the_attach_stream(tmp_path, monkeypatch):
    """The agent is told of a socket it cannot reach (here: the directory is not mounted; under runsc without
    --host-uds=open the connect is refused): it says hello on stdout and the attach stream carries the data."""
    async with backend_of(tmp_path) as backend:
        real = backend.create_and_attach

        def without_mount(session_id, command=None, run_dir=None, extra_env=None, workspace=None):
            return real(session_id, run_dir=None, extra_env=extra_env, workspace=workspace)

        monkeypatch.setattr(backend, "create_and_attach", without_mount)
        sb = await backend.start("fallback")
        try:
            assert sb.channel == "attach" and sb.hello["channel"] == "attach"
            path = backend._rundirs[sb.id].path
            assert os.listdir(path) == []  # the offer was withdrawn: nothing listens there any more
            ev = Events()
            done = await sb.request("run_code", {"code": "print('via attach')\n6 * 7"}, ev, deadline_s=DEADLINE)
            assert done["ok"] and ev.text() == "via attach\n" and ev.results()[-1]["data"]["text/plain"] == "42"
        finally:
            await sb.close()
        assert not os.path.exists(path)


@pytest.mark.docker
async def test_a_connection_without_the_sandboxs_nonce_is_refused(tmp_path, monkeypatch):
    """The first line on the socket must carry the nonce the server gave this sandbox: else no sandbox."""
    real = channel_mod.SocketOffer.environment
    monkeypatch.setattr(
        channel_mod.SocketOffer,
        "environment",
        lambda self: {**real(self), channel_mod.NONCE_VAR: "0" * 32},
    )
    async with backend_of(tmp_path) as backend:
        with pytest.raises(SandboxUnavailable, match="nonce"):
            await backend.start("wrong-nonce")
        assert backend._rundirs == {}
        assert os.listdir(backend.run_root) == []  # its directory went with it


@pytest.mark.docker
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_attach_stream_is_the_lifeline(tmp_path, runtime):
    """With the frames on the socket, closing the server's end of the attach stream alone (what the kernel does
    to it when the server is killed) still ends the agent and the container."""
    async with backend_of(tmp_path, runtime=runtime) as backend:
        sb = await backend.start("lifeline")
        try:
            assert sb.channel == "socket"
            sb._lifeline.close()
            assert await wait_gone(sb.id)
        finally:
            await sb.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to uid 1000 needs root")
def test_run_dirs_of_a_gone_server_are_reaped(tmp_path):
    root = str(tmp_path)
    mine = rundir.RunDir(root, NAMESPACE, "aaaa")
    theirs = rundir.RunDir(root, NAMESPACE, "bbbb")
    other_ns = rundir.RunDir(root, NAMESPACE + "-other", "bbbb")
    for d in (mine, theirs, other_ns):
        d.create()
        d.listen(rundir.AGENT_SOCKET).close()
    assert sorted(os.listdir(theirs.path)) == ["agent.sock"]
    st = os.stat(theirs.socket_path(rundir.AGENT_SOCKET))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1000
    assert rundir.reap(root, NAMESPACE, keep_instance="aaaa") == 1
    assert sorted(os.listdir(root)) == sorted(os.path.basename(d.path) for d in (mine, other_ns))
    assert rundir.reap_instance(root, NAMESPACE, "aaaa") == 1
    assert os.listdir(root) == [os.path.basename(other_ns.path)]


@pytest.mark.skipif(os.geteuid() != 0, reason="a root of another user is made with chown")
def test_a_run_root_of_another_user_or_a_link_is_refused_and_ours_is_made_private(tmp_path):
    """The default root of a server that is not root is /tmp/groundloop-<uid>: another user of the host could make
    it first and then swap a sandbox's directory or socket. Such a root is refused (the attach stream is used)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 1234, 1234)
    with pytest.raises(OSError):
        rundir.RunDir(str(theirs), NAMESPACE, "aaaa").create()
    with pytest.raises(OSError):
        rundir.InstanceLock(str(theirs), NAMESPACE, "aaaa").acquire()
    assert os.listdir(theirs) == []
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OSError):
        rundir.RunDir(str(link), NAMESPACE, "aaaa").create()
    local_engine = type("Client", (), {"api": type("API", (), {"base_url": "http+docker://localhost"})()})()
    backend = DockerBackend(sandbox_settings(pool_size=0, run_dir=str(theirs), channel="auto"), client=local_engine)
    assert backend.prepare_channel() == (None, None)  # the attach stream, and it is logged why
    assert backend._socket_refused and "not a directory of this server's user" in backend._socket_refused
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    os.chmod(ours, 0o755)
    d = rundir.RunDir(str(ours), NAMESPACE, "aaaa")
    d.create()
    assert stat.S_IMODE(os.stat(ours).st_mode) == 0o700 and os.path.isdir(d.path)


def test_a_server_running_beside_us_keeps_its_directories(tmp_path):
    """Servers sharing a namespace on one host (replicas, the tests' own): the sweep at start takes only a
    gone server's directories; a running one holds its instance lock, which dies with its process."""
    root = str(tmp_path)
    alive = rundir.InstanceLock(root, NAMESPACE, "bbbb")
    alive.acquire()
    gone = rundir.InstanceLock(root, NAMESPACE, "cccc")
    gone.acquire()
    os.close(gone.fd)  # what the kernel does when that server is killed: the lock goes, its file stays
    gone.fd = -1
    os.makedirs(os.path.join(root, f"{NAMESPACE}.bbbb.0001"))
    os.makedirs(os.path.join(root, f"{NAMESPACE}.cccc.0002"))
    assert rundir.instance_alive(root, NAMESPACE, "bbbb")
    assert not rundir.instance_alive(root, NAMESPACE, "dddd")  # never had a lock
    assert rundir.reap(root, NAMESPACE, keep_instance="aaaa") == 1
    assert sorted(os.listdir(root)) == [".instances", f"{NAMESPACE}.bbbb.0001"]
    assert os.listdir(os.path.join(root, ".instances")) == [f"{NAMESPACE}.bbbb"]  # the dead one's file went too
    alive.release()
    assert not rundir.instance_alive(root, NAMESPACE, "bbbb")
    assert os.listdir(os.path.join(root, ".instances")) == []


def test_the_sweep_removes_the_lock_file_of_a_killed_server_that_left_no_directory(tmp_path):
    root = str(tmp_path)
    mine = rundir.InstanceLock(root, NAMESPACE, "aaaa")
    mine.acquire()
    running = rundir.InstanceLock(root, NAMESPACE, "bbbb")
    running.acquire()
    other_ns = rundir.InstanceLock(root, NAMESPACE + "-x", "cccc")
    other_ns.acquire()
    for killed in (rundir.InstanceLock(root, NAMESPACE, "dddd"), rundir.InstanceLock(root, NAMESPACE + "-x", "eeee")):
        killed.acquire()
        os.close(killed.fd)  # killed: the lock goes with the process, the file stays
    assert rundir.reap(root, NAMESPACE, keep_instance="aaaa") == 0
    assert sorted(os.listdir(os.path.join(root, ".instances"))) == [
        f"{NAMESPACE}-x.cccc",
        f"{NAMESPACE}-x.eeee",  # another namespace's: its own servers' sweep
        f"{NAMESPACE}.aaaa",
        f"{NAMESPACE}.bbbb",
    ]
    for lock in (mine, running, other_ns):
        lock.release()


@pytest.mark.docker
async def test_a_second_server_in_the_namespace_leaves_the_first_ones_sandboxes(tmp_path):
    """Its start-up sweep used to remove every container and directory of the namespace but its own, so a
    sandbox starting on the first server lost its directory between mkdir and the engine's mount."""
    async with backend_of(tmp_path) as first, backend_of(tmp_path) as second:
        await first.reap_orphans()
        sb = await first.start("first")
        try:
            assert sb.channel == "socket"
            assert await second.reap_orphans() == 0
            assert os.path.isdir(sb.run_dir)
            assert (await sb.request("ping", deadline_s=DEADLINE))["ok"]
        finally:
            await sb.close()


@pytest.mark.docker
async def test_an_engine_that_cannot_mount_the_directory_gets_the_attach_stream(tmp_path, monkeypatch):
    """A server in a container whose run directory the engine does not have: the mount is refused (not made
    empty), that sandbox starts on the attach stream, and the backend stops offering the socket."""
    async with backend_of(tmp_path) as backend:
        real = backend.prepare_channel

        def elsewhere(egress=False):
            rd, offer = real(egress)
            rd.path = str(tmp_path / "not-on-the-engine")  # what the engine would look for on its own host
            return rd, offer

        monkeypatch.setattr(backend, "prepare_channel", elsewhere)
        sb = await backend.start("no-mount")
        try:
            assert sb.channel == "attach" and backend._socket_broken and backend._rundirs == {}
            assert (await sb.request("ping", deadline_s=DEADLINE))["ok"]
        finally:
            await sb.close()
        monkeypatch.setattr(backend, "prepare_channel", real)
        assert backend.prepare_channel() == (None, None)
        assert not (tmp_path / "not-on-the-engine").exists()


@pytest.mark.docker
async def test_a_start_cancelled_at_any_point_leaves_nothing_behind(tmp_path):
    """Every step of DockerBackend.start makes something (a run directory and its socket, a container, the
    connection): a start cancelled before, during or after each leaves no container and no directory."""
    async with backend_of(tmp_path) as backend:
        await backend.reap_orphans()
        run = tmp_path / "run"
        for i, after in enumerate((0.0, 0.005, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)):
            session = f"cancelled-{i}"
            task = asyncio.create_task(backend.start(session))
            await asyncio.sleep(after)
            task.cancel()
            try:
                sb = await task
            except asyncio.CancelledError:
                pass
            else:  # it was done before the cancel: then its close is the undo
                await sb.close()
            with contextlib.closing(docker.from_env()) as client:
                left = client.api.containers(all=True, filters={"label": f"groundloop.session={session}"})
            assert left == [], (after, left)
            assert [n for n in os.listdir(run) if not n.startswith(".")] == [], after


def test_a_lock_file_a_sweep_holds_for_a_moment_is_taken_once_it_lets_go(tmp_path):
    """Another server's start-up sweep takes the lock of a file it finds unlocked (to tell a dead instance) and
    unlinks it: a server that made that file a moment before must get its lock, not give up."""
    import fcntl
    import threading
    import time

    root = str(tmp_path)
    rundir.make_root(root)
    os.makedirs(os.path.join(root, ".instances"), mode=0o700)
    path = os.path.join(root, ".instances", f"{NAMESPACE}.aaaa")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def sweep_lets_go():
        time.sleep(0.05)
        os.unlink(path)
        os.close(fd)

    sweep = threading.Thread(target=sweep_lets_go)
    sweep.start()
    lock = rundir.InstanceLock(root, NAMESPACE, "aaaa")
    try:
        lock.acquire()
        sweep.join()
        assert rundir.instance_alive(root, NAMESPACE, "aaaa")  # held, on the file the path names now
    finally:
        sweep.join()
        lock.release()
