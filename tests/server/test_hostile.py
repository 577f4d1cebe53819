"""Hostile code over the real WebSocket, under runc and runsc (gVisor).

One server per runtime (module-scoped, small limits so bombs end fast). A
bystander session of another user runs ``1 + 1`` in a loop the whole time.
For every hostile program, run in a fresh session of its own:

- the hostile request ends with one ``done`` in bounded time;
- the session stays usable afterwards (``1 + 1`` answers 2), or it said
  clearly that its sandbox was replaced (``sandbox_replaced``) and the new one
  answers;
- the bystander's requests all succeed, and at least one completed while the
  hostile program ran (its latency goes to ``bench/hostile.py``, not here);
- the server process's memory stays bounded.

Then the isolation checks (network, Docker socket, environment, capabilities,
/proc masking), without sending any traffic off loopback.

Set ``GROUNDLOOP_HOSTILE_REPORT=/path.json`` to record each case's observed
outcome (used to write the table of docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time

import pytest
import pytest_asyncio
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.system import rss
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "hostile-" + secrets.token_hex(16)  # alice's token: must never be visible inside
BYSTANDER_TOKEN = "bystander-" + secrets.token_hex(16)
PROBE_VAR = "GROUNDLOOP_HOSTILE_PROBE"
PROBE_VALUE = "probe-" + secrets.token_hex(16)  # a server-side env var: must never be visible inside
WAIT = 120.0  # bound on any one hostile request, far above its timeout_s (loaded CI machine)
TIMEOUT_S = 2  # the hostile requests' own timeout_s
MEMORY = "256m"
RSS_BOUND = 200 << 20  # server (in-process) RSS growth allowed over the whole module
FILE_MAX = 4 << 20
REPORT: dict[str, dict] = {}

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]


class Bystander:
    """Another user's session that runs ``1 + 1`` back to back until stopped."""

    def __init__(self, client: WSClient):
        self.c = client
        self.ok = 0
        self.failures: list[dict] = []
        self.latencies: list[float] = []
        self.progress = asyncio.Event()
        self._stop = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="bystander")

    async def _loop(self) -> None:
        while not self._stop:
            t0 = time.perf_counter()
            frames = await self.c.request("run_code", code="1 + 1")
            self.latencies.append(time.perf_counter() - t0)
            done = frames[-1]
            results = [f for f in frames if f["type"] == "result"]
            if done["ok"] and results and results[-1]["data"].get("text/plain") == "2":
                self.ok += 1
            else:
                self.failures.append(done)
            self.progress.set()
            self.progress = asyncio.Event()

    async def one_more(self) -> None:
        """Wait until the bystander completes one more request (it must still be alive)."""
        assert self.task is not None and not self.task.done(), self.task
        waiter = asyncio.ensure_future(self.progress.wait())
        finished, _ = await asyncio.wait([waiter, self.task], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert finished, "the bystander made no progress"
        if self.task in finished:
            self.task.result()
            raise AssertionError("the bystander stopped")

    async def stop(self) -> None:
        self._stop = True
        if self.task is not None:
            await asyncio.wait_for(self.task, WAIT)


class Env:
    def __init__(self, runtime, srv, bystander):
        self.runtime = runtime
        self.srv = srv
        self.bystander = bystander
        self.rss0 = rss()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def env(request):
    runtime = request.param
    sb = sandbox_settings(
        runtime=runtime,
        pool_size=2,
        memory=MEMORY,
        pids_limit=128,
        tmp_size="32m",
        workspace_size="32m",
        max_file_bytes=FILE_MAX,
        max_output_bytes=1 << 20,
        exec_timeout_s=10.0,
        start_timeout_s=60.0,
    )
    settings = server_settings(
        sandbox=sb,
        tokens=[f"{TOKEN}:alice", f"{BYSTANDER_TOKEN}:bob"],
        resume_grace_s=1.0,
        max_sessions_per_user=16,
        # The bystander asks as fast as it is answered: over 1,000 a second with the socket channel.
        rate_per_s=1e6,
        rate_burst=1_000_000,
    )
    old = os.environ.get(PROBE_VAR)
    os.environ[PROBE_VAR] = PROBE_VALUE
    try:
        async with run_server(settings) as srv:
            async with await WSClient.connect(srv.url, token=BYSTANDER_TOKEN) as bc:
                assert bc.ready["sandbox"]["runtime"] == runtime
                by = Bystander(bc)
                by.start()
                await by.one_more()
                e = Env(runtime, srv, by)
                yield e
                await by.stop()
                assert not by.failures, by.failures[:3]
            assert rss() - e.rss0 < RSS_BOUND
    finally:
        if old is None:
            os.environ.pop(PROBE_VAR, None)
        else:
            os.environ[PROBE_VAR] = old
        path = os.environ.get("GROUNDLOOP_HOSTILE_REPORT")
        if path and REPORT:
            with open(path, "w") as f:
                json.dump(REPORT, f, indent=1, sort_keys=True)


# ---- the hostile programs: (kind, payload, timeout_s) ------------------------------------------
# kind "code" is run_code (python), "exec" a shell command.

FORK_BOMB_PY = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
THREAD_BOMB = """
import threading, time
n = 0
while True:
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    n += 1
"""
MEMORY_BOMB = """
hog = []
while True:
    hog.append(bytearray(8 << 20))
    hog[-1][::4096] = b'x' * len(hog[-1][::4096])
"""
FILL = """
import os, errno
os.makedirs({path!r}, exist_ok=True)
i = 0
try:
    while True:
        with open(os.path.join({path!r}, f'fill{{i}}'), 'wb') as f:
            f.write(b'x' * (1 << 20))
        i += 1
except OSError as exc:
    print('stopped', errno.errorcode.get(exc.errno), 'after', i, 'MiB')
for n in range(i + 1):
    try:
        os.unlink(os.path.join({path!r}, f'fill{{n}}'))
    except FileNotFoundError:
        pass
"""
FILE_TOO_BIG = f"""
with open('/workspace/big', 'wb') as f:
    f.write(b'x' * ({FILE_MAX} + 1))
"""
READ_ONLY_ROOT = """
import os
for p in ('/etc/evil', '/usr/bin/evil', '/opt/groundloop/groundloop_agent/agent.py', '/evil'):
    try:
        open(p, 'w').write('x')
    except OSError as exc:
        print(p, type(exc).__name__)
    else:
        print(p, 'WRITTEN')
"""
PRINT_LOOP = "while True:\n    print('spam ' * 20)"
# 2,000 times line_max_bytes. Not 64 MiB: the string and its encoded copy then held 128 MiB of a 256 MiB
# sandbox, and under runsc the memory guard (which leaves the code the limit less 64 MiB and 10 %, docs/security.md
# item 8) killed the worker before it wrote: what is tested here is the line's split, not the guard.
HUGE_LINE = "import sys\nsys.stdout.write('x' * (32 << 20))\nsys.stdout.flush()"
BINARY = (
    "import sys, os\n"
    "sys.stdout.buffer.write(bytes(range(256)) * 64 + b'\\xff\\xfe\\xc3\\x28\\n'); sys.stdout.flush()\n"
    "os.write(2, b'\\x00\\x80\\xed\\xa0\\x80 surrogate\\n')\n"
    "print('\\udcff'.encode('utf-8', 'surrogateescape').decode('latin-1'))"
)
BUSY = "while True:\n    pass"
SLEEP = "import time\ntime.sleep(10 ** 9)"
IGNORE_SIGNALS = (
    "import signal\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True:\n    pass"
)
DAEMON = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        while True:\n"
    "            time.sleep(1000)\n"
    "    os._exit(0)\n"
    "os.wait()\n"
    "print('daemon started')"
)
ZOMBIES = (
    "import os\n"
    "kids = []\n"
    "for _ in range(40):\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        os._exit(0)\n"
    "    kids.append(pid)\n"
    "import time; time.sleep(0.2)\n"
    "print('zombies', sum(1 for p in kids if open(f'/proc/{p}/stat').read().split(')')[1].split()[0] == 'Z'))"
)
OPEN_FILES = (
    "fds = []\n"
    "try:\n"
    "    while True:\n"
    "        fds.append(open('/dev/null'))\n"
    "except OSError as exc:\n"
    "    print('stopped after', len(fds), type(exc).__name__, exc.errno)\n"
    "for f in fds:\n"
    "    f.close()\n"
    "del fds"
)
BECOME_ROOT = (
    "import os, ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for name, call in [('setuid', lambda: os.setuid(0)), ('setgid', lambda: os.setgid(0)),\n"
    "                   ('seteuid', lambda: os.seteuid(0))]:\n"
    "    try:\n"
    "        call()\n"
    "        print(name, 'SUCCEEDED')\n"
    "    except OSError as exc:\n"
    "        print(name, 'refused', exc.errno)\n"
    "os.makedirs('/tmp/m', exist_ok=True)\n"
    "r = libc.mount(b'none', b'/tmp/m', b'tmpfs', 0, None)\n"
    "print('mount', 'SUCCEEDED' if r == 0 else 'refused', ctypes.get_errno())\n"
    "print('uid', os.getuid(), os.geteuid())\n"
    "r = libc.unshare(0x10000000)  # CLONE_NEWUSER\n"
    "print('unshare', 'SUCCEEDED' if r == 0 else 'refused', ctypes.get_errno())"
)

CASES = {
    "fork_bomb_python": ("code", FORK_BOMB_PY, TIMEOUT_S),
    "fork_bomb_exec": ("exec", "python3 -c '" + FORK_BOMB_PY.strip() + "'", TIMEOUT_S),
    "fork_bomb_shell": ("exec", "bomb() { bomb | bomb & }; bomb", TIMEOUT_S),
    "thread_bomb": ("code", THREAD_BOMB, TIMEOUT_S),
    "memory_bomb": ("code", MEMORY_BOMB, 20),
    "fill_tmp": ("code", FILL.format(path="/tmp/fill"), 30),
    "fill_workspace": ("code", FILL.format(path="/workspace/fill"), 30),
    "fill_dev_shm": ("code", FILL.format(path="/dev/shm/fill"), 30),
    "file_past_size_limit": ("code", FILE_TOO_BIG, 10),
    "write_read_only_root": ("code", READ_ONLY_ROOT, 10),
    "endless_print": ("code", PRINT_LOOP, TIMEOUT_S),
    "enormous_line": ("code", HUGE_LINE, 20),
    "binary_output": ("code", BINARY, 10),
    "busy_loop": ("code", BUSY, TIMEOUT_S),
    "sleep_forever": ("code", SLEEP, TIMEOUT_S),
    "ignore_sigint_sigterm": ("code", IGNORE_SIGNALS, TIMEOUT_S),
    "double_fork_daemon": ("code", DAEMON, 10),
    "double_fork_daemon_shell": ("exec", "(setsid sh -c 'sleep 1000' &); echo started", 10),
    "zombies": ("code", ZOMBIES, 10),
    "open_files": ("code", OPEN_FILES, 10),
    "become_root_or_mount": ("code", BECOME_ROOT, 10),
}


def _summary(frames: list[dict]) -> dict:
    done = frames[-1]
    out = WSClient.text(frames) + WSClient.text(frames, "stderr")
    return {
        "ok": done["ok"],
        "error": (done.get("error") or {}).get("name"),
        "truncated": bool(done.get("truncated")),
        "exit_code": done.get("exit_code"),
        "frames": len(frames),
        "tail": out[-300:],
    }


async def _usable(c: WSClient) -> dict:
    """``1 + 1`` answers 2; returns its done. Retried once after a sandbox_replaced (the replacement
    can race with the first try, which then ends SandboxLost: that is said clearly, not silently), and once
    after WorkerDied: under gVisor the Sentry frees a bomb's memory seconds after its processes die, and until
    then the memory guard may take the context's next worker, which a zygote hands over at once (said as
    WorkerDied; the context restarts empty)."""
    for _ in range(3):
        frames = await asyncio.wait_for(c.request("run_code", code="1 + 1", timeout_s=30), WAIT)
        done = frames[-1]
        if done["ok"]:
            assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == ["2"], frames
            return done
        assert done["error"]["name"] in ("SandboxLost", "WorkerDied"), done
        if done["error"]["name"] == "WorkerDied":
            await asyncio.sleep(1)
            continue
        while not any(f["type"] == "sandbox_replaced" for f in c.frames):
            await c.recv(WAIT)
    raise AssertionError(f"the session is not usable: {done}")


def _case_params():
    for name in CASES:
        yield pytest.param(name, id=name)


@pytest.mark.parametrize("case", list(_case_params()))
async def test_hostile(env, case):
    kind, payload, timeout_s = CASES[case]
    by = env.bystander
    before_ok = by.ok
    async with await WSClient.connect(env.srv.url, token=TOKEN) as c:
        sid = c.session_id
        await _usable(c)  # a warm context: the hostile cell runs where a real session's would
        if kind == "code":
            rid = await c.send("run_code", code=payload, timeout_s=timeout_s)
        else:
            rid = await c.send("exec", command=payload, timeout_s=timeout_s)
        frames = await c.until_done(rid, timeout=WAIT)
        dones = [f for f in frames if f["type"] == "done"]
        assert len(dones) == 1 and frames[-1] is dones[0]
        summary = _summary(frames)
        await _usable(c)
        replaced = [f for f in c.frames if f["type"] == "sandbox_replaced"]
        for f in replaced:
            assert f["state_lost"] is True and f["session_id"] == sid and f["reason"]
        summary["sandbox_replaced"] = bool(replaced)
        check = CHECKS.get(case)
        # Under both runtimes the bombs are contained in the sandbox: the session keeps its sandbox.
        # (Under gVisor they used to take the whole sandbox: the pids limit made the Sentry panic and an
        # OOM kill of one of its stubs made it kill itself; see docs/security.md, item 8.) Only runc's
        # memory bomb may still end the sandbox, should the OOM killer pick the agent over the worker.
        may_lose = env.runtime == "runc" and case == "memory_bomb"
        if summary["error"] == "SandboxLost":
            assert replaced and may_lose, summary  # then said clearly
        elif check:
            check(frames, summary, env.runtime)
        if case in CONTAINED and not may_lose:
            assert not replaced, summary
        if case.startswith("double_fork_daemon"):
            # the daemon outlives its request, not its session
            session = env.srv.state.manager.sessions[sid]
            container = session.sb.id
    await by.one_more()  # the bystander is still answered after the hostile run
    assert by.ok > before_ok and not by.failures, by.failures[:3]
    if case.startswith("double_fork_daemon"):
        session = env.srv.state.manager.sessions.get(sid)
        if session is not None:
            await asyncio.wait_for(session.closed.wait(), WAIT)
        assert not await asyncio.to_thread(_container_exists, container)
    assert rss() - env.rss0 < RSS_BOUND
    REPORT.setdefault(env.runtime, {})[case] = summary


def _container_exists(cid: str) -> bool:
    import docker

    with contextlib.closing(docker.from_env()) as client:
        try:
            c = client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return False
        return bool(c["State"]["Running"])


# ---- per-case expectations beyond "done, usable, bystander fine" ------------------------------


def assert_(cond, what):
    assert cond, what


def _timeout(frames, s, runtime):
    # Under gVisor the memory guard may end a bomb before its timeout (docs/security.md, item 8): WorkerDied,
    # said as such, the context restarted empty.
    ends = ("Timeout", "SandboxLost", "WorkerDied") if runtime == "runsc" else ("Timeout", "SandboxLost")
    assert s["ok"] is False and s["error"] in ends, s


def _refused_write(frames, s, runtime):
    text = WSClient.text(frames)
    assert "WRITTEN" not in text, text
    assert text.count("Error") >= 4, text


def _fill(frames, s, runtime):
    assert s["ok"], s
    assert "stopped ENOSPC" in WSClient.text(frames) or "stopped EFBIG" in WSClient.text(frames), s


def _too_big(frames, s, runtime):
    assert s["ok"] is False and s["error"] in ("OSError", "FileTooLarge", "WorkerDied"), s


def _huge_line(frames, s, runtime):
    limit = 16 << 10
    texts = [f["text"] for f in frames if f["type"] == "stdout"]
    assert texts and all(len(t.encode()) <= limit for t in texts)
    assert s["truncated"], s


def _print_loop(frames, s, runtime):
    _timeout(frames, s, runtime)
    assert s["truncated"] or s["error"] == "Timeout", s


def _binary(frames, s, runtime):
    assert s["ok"], s
    text = WSClient.text(frames)
    assert "\ufffd" in text and "surrogate" in WSClient.text(frames, "stderr")


def _zombies(frames, s, runtime):
    if runtime == "runsc" and not s["ok"]:
        # gVisor's process cap (RLIMIT_NPROC, 22 at 256 MiB: docker_backend.guest_process_cap) refuses
        # the fork past it, before 40 forks of the worker (~5 MiB each) fill the memory
        assert s["error"] == "BlockingIOError", s
        return
    assert s["ok"] and "zombies 40" in s["tail"], s


def _memory_bomb(frames, s, runtime):
    # runc: the OOM killer takes the worker (oom_score_adj 1000); runsc: the agent's memory guard does
    assert s["ok"] is False and s["error"] in ("WorkerDied", "MemoryError"), s


def _open_files(frames, s, runtime):
    assert s["ok"] and "stopped after" in WSClient.text(frames), s


def _root(frames, s, runtime):
    text = WSClient.text(frames)
    if runtime == "runsc":
        # gVisor's sentry implements user namespaces itself: unshare(CLONE_NEWUSER) gives a namespace
        # inside the sandbox kernel, with no privilege on the host
        text = text.replace("unshare SUCCEEDED", "unshare emulated")
    assert s["ok"] and "SUCCEEDED" not in text and "uid 1000 1000" in text, text


def _daemon(frames, s, runtime):
    assert s["ok"] and "started" in WSClient.text(frames), s


CONTAINED = {"fork_bomb_python", "fork_bomb_exec", "fork_bomb_shell", "thread_bomb", "memory_bomb", "zombies"}

CHECKS = {
    "fork_bomb_python": _timeout,
    "fork_bomb_exec": _timeout,
    "memory_bomb": _memory_bomb,
    "thread_bomb": lambda frames, s, runtime: assert_(not s["ok"] or s["error"] == "Timeout", s),
    "busy_loop": _timeout,
    "sleep_forever": _timeout,
    "ignore_sigint_sigterm": _timeout,
    "endless_print": _print_loop,
    "enormous_line": _huge_line,
    "binary_output": _binary,
    "write_read_only_root": _refused_write,
    "fill_tmp": _fill,
    "fill_workspace": _fill,
    "fill_dev_shm": _fill,
    "file_past_size_limit": _too_big,
    "zombies": _zombies,
    "open_files": _open_files,
    "become_root_or_mount": _root,
    "double_fork_daemon": _daemon,
    "double_fork_daemon_shell": _daemon,
}


# ---- isolation ---------------------------------------------------------------------------------

ISOLATION = r"""
import json, os, glob
out = {}
try:
    with open('/proc/net/dev') as f:
        out['ifaces'] = sorted(l.split(':')[0].strip() for l in f.read().splitlines()[2:] if ':' in l)
except OSError as exc:
    out['ifaces'] = 'error ' + str(exc)
out['sys_class_net'] = sorted(os.listdir('/sys/class/net')) if os.path.isdir('/sys/class/net') else None
out['docker_sock'] = [p for p in ('/var/run/docker.sock', '/run/docker.sock', '/var/run/docker',
                                  '/run/containerd/containerd.sock') if os.path.exists(p)]
out['sockets'] = [p for p in glob.glob('/**/*.sock', recursive=False)]
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
out['caps'] = {k: status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb') if k in status}
out['no_new_privs'] = status.get('NoNewPrivs', '').strip()
out['seccomp'] = status.get('Seccomp', '').strip()
out['uid'] = [os.getuid(), os.geteuid(), os.getgid()]
envs = [json.dumps(dict(os.environ))]
for p in glob.glob('/proc/[0-9]*/environ'):
    try:
        envs.append(open(p, 'rb').read().decode('utf-8', 'replace'))
    except OSError:
        pass
out['env_blobs'] = len(envs)
blob = '\n'.join(envs)
out['groundloop_vars'] = sorted({w.split('=')[0] for w in blob.replace('\x00', '\n').split('\n')
                                 if w.startswith('GROUNDLOOP_') and not w.startswith('GROUNDLOOP_WORKDIR')})
out['secrets_seen'] = [s for s in ('__TOKEN__', '__PROBE__', '__BYSTANDER__') if s in blob]
def readable(p):
    try:
        with open(p, 'rb') as f:
            return len(f.read(64))
    except OSError as exc:
        return type(exc).__name__
out['kcore'] = readable('/proc/kcore') if os.path.exists('/proc/kcore') else 'absent'
out['keys'] = readable('/proc/keys') if os.path.exists('/proc/keys') else 'absent'
out['timer_list'] = readable('/proc/timer_list') if os.path.exists('/proc/timer_list') else 'absent'
def writable(p):
    try:
        with open(p, 'w') as f:
            f.write('1')
        return 'WRITTEN'
    except OSError as exc:
        return type(exc).__name__
out['sysrq'] = writable('/proc/sysrq-trigger') if os.path.exists('/proc/sysrq-trigger') else 'absent'
out['proc_sys'] = writable('/proc/sys/kernel/hostname')
out['hostname'] = open('/proc/sys/kernel/hostname').read().strip()
out['root_ro'] = writable('/rootfile')
print(json.dumps(out))
"""


# the agent's own pipes to its workers and its zygote's socket, (runsc) the threshold of its memory guard, and the
# data channel's socket and nonce (runsc shows the agent's first environment; the nonce is spent: the server accepts
# one connection)
AGENT_VARS = {
    "GROUNDLOOP_CMD_FD",
    "GROUNDLOOP_RES_FD",
    "GROUNDLOOP_ZYGOTE_FD",
    "GROUNDLOOP_MEMORY_GUARD_BYTES",
    "GROUNDLOOP_CHANNEL",
    "GROUNDLOOP_CHANNEL_NONCE",
}


async def test_isolation(env):
    code = (
        ISOLATION.replace("__TOKEN__", TOKEN)
        .replace("__PROBE__", PROBE_VALUE)
        .replace("__BYSTANDER__", BYSTANDER_TOKEN)
    )
    async with await WSClient.connect(env.srv.url, token=TOKEN) as c:
        frames = await c.request("run_code", code=code, timeout_s=30)
        assert frames[-1]["ok"], frames[-1]
        out = json.loads(WSClient.text(frames))
        # no network but loopback, no route to Docker
        assert out["ifaces"] == ["lo"], out
        assert out["sys_class_net"] in (None, ["lo"]), out
        assert out["docker_sock"] == [] and out["sockets"] == [], out
        # nothing of the server's environment or tokens
        assert out["env_blobs"] >= 2 and out["secrets_seen"] == [], out
        assert set(out["groundloop_vars"]) <= AGENT_VARS, out
        # no capabilities, no new privileges, an unprivileged user
        assert out["caps"]["CapEff"] == "0000000000000000" and out["caps"]["CapPrm"] == "0000000000000000", out
        assert out["caps"]["CapBnd"] == "0000000000000000", out
        assert out["no_new_privs"] == ("1" if env.runtime == "runc" else out["no_new_privs"]) and out["uid"] == [
            1000,
            1000,
            1000,
        ], out
        # /proc masking: kernel memory and keys unreadable or empty, /proc/sys read-only
        for key in ("kcore", "keys", "timer_list"):
            assert out[key] in ("absent", 0) or isinstance(out[key], str), out
        assert out["sysrq"] != "WRITTEN" and out["proc_sys"] != "WRITTEN" and out["root_ro"] != "WRITTEN", out
        assert out["hostname"] == "sandbox", out
        if env.runtime == "runc":
            assert out["seccomp"] == "2", out  # filter mode: Docker's default profile
        REPORT.setdefault(env.runtime, {})["isolation"] = out
