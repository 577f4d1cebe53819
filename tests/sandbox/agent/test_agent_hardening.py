"""Hardening of the agent (issue 21, items 4, 5, 6, 13) in real sandboxes, under runc and runsc (gVisor).

Each test starts a sandbox of its own from an engine of its runtime and talks to the agent through
the server's Sandbox reader, the way a session does.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.engine import Engine
from support.collect import Collector as Events
from support.collect import call, sandbox_of
from support.env import sandbox_settings
from support.system import peak_rss, peak_rss_reset, rss

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
DEADLINE = 60.0  # the server's own guard: a request not answered by then means a stalled agent


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def engine(request):
    settings = sandbox_settings(pool_size=0, runtime=request.param)
    eng = Engine(DockerBackend(settings), settings)
    await eng.start()
    yield eng
    await eng.close()


# ---- item 13: file operations never block the agent's loop; non-regular files get a clear error


async def test_read_and_write_of_a_fifo_or_the_agents_stdin_fail_fast(engine):
    async with sandbox_of(engine) as sb:
        done, _ = await call(sb, "exec", command="mkfifo /workspace/fifo && echo made")
        assert done["ok"] and done["exit_code"] == 0
        for op, params in (
            ("read_file", {"path": "fifo"}),
            ("write_file", {"path": "fifo", "content": "x"}),
            ("read_file", {"path": "/proc/self/fd/0"}),
            ("read_file", {"path": "/dev/zero"}),
        ):
            done, _ = await call(sb, op, **params)
            assert not done["ok"], (op, params, done)
            assert done["error"]["name"] == "NotARegularFile", (op, params, done)
        # The session's agent is still there and serves the next request.
        done, ev = await call(sb, "run_code", code="40 + 2")
        assert done["ok"] and ev.results()[-1]["data"]["text/plain"] == "42"


# ---- item 6: a cell cannot break its context's stdout/stderr for the cells after it


async def test_a_cell_that_closes_its_stdio_leaves_the_context_usable(engine):
    async with sandbox_of(engine) as sb:
        done, _ = await call(sb, "run_code", code="import os, sys\nos.close(1)\nos.close(2)\nos.close(0)")
        assert done["ok"], done
        done, ev = await call(sb, "run_code", code="import sys\nprint('back')\nprint('err', file=sys.stderr)\n1")
        assert done["ok"], done
        assert ev.text() == "back\n" and ev.text("stderr") == "err\n"
        done, _ = await call(sb, "run_code", code="import sys\nsys.stdout.close()\nsys.stderr.close()")
        assert done["ok"], done
        done, ev = await call(sb, "run_code", code="print('again')")
        assert done["ok"] and ev.text() == "again\n", (done, ev.events)
        done, _ = await call(sb, "run_code", code="import os\nfd = os.open('/dev/null', os.O_WRONLY)\nos.dup2(fd, 1)")
        done, ev = await call(sb, "run_code", code="print('not lost')")
        assert ev.text() == "not lost\n"


# ---- item 5: the code cannot write frames as the agent (no /proc/<pid>/fd, no ptrace)

ATTACK = r"""
import ctypes, json, os, sys
rid, agent_pid = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
forged = (
    json.dumps({"ev": "done", "rid": rid, "ok": True, "type": "forged", "seq": 0}) + "\n"
    + json.dumps({"ev": "log", "message": "FORGED"}) + "\n"
).encode()
report = {"wrote": [], "ptrace": []}
for pid in (1, agent_pid):  # the processes that hold the frame stream
    for fd in range(64):
        try:
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(f, forged)
            report["wrote"].append([pid, fd, os.readlink(f"/proc/{pid}/fd/{fd}")])
        except OSError:
            pass
        os.close(f)
for pid in (1, agent_pid):
    if libc.ptrace(0x4206, pid, None, None) == 0:  # PTRACE_SEIZE: does not stop the process
        report["ptrace"].append(pid)
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
print(json.dumps(report))
"""


async def test_the_code_cannot_forge_frames_through_proc_or_ptrace(engine):
    async with sandbox_of(engine) as sb:
        done, _ = await call(sb, "write_file", path="attack.py", content=ATTACK)
        assert done["ok"]
        victim = Events()
        victim_fut = sb.submit("run_code", {"code": "import time\ntime.sleep(3)\n'real'"}, victim, rid="victim-1")
        await asyncio.sleep(0.5)  # the victim is running
        done, ev = await call(sb, "exec", command=f"python3 attack.py victim-1 {sb.hello['pid']}")
        assert done["ok"] and done["exit_code"] == 0, (done, ev.text("stderr"))
        report = json.loads(ev.text().strip().splitlines()[-1])
        assert report["ptrace"] == [], report  # neither pid 1 nor the agent can be traced
        victim_done = await asyncio.wait_for(victim_fut, DEADLINE)
        # Whatever got through, the server passes on only a done's known fields, once.
        assert set(victim_done) <= {"ev", "rid", "ok", "context", "execution_count", "agent_ms"}, victim_done
        if sb.runtime == "runc":
            # The door is shut: no process of the code can write into the frame stream.
            assert report["wrote"] == [], report
            assert victim_done["ok"] and victim.results()[-1]["data"]["text/plain"] == "'real'"
            assert not [e for e in sb.background.events if "FORGED" in json.dumps(e)]
        if sb.channel == "socket":
            # The frames take a socket, which no process can open through /proc/<pid>/fd, even under gVisor:
            # what the code writes into the agent's stdout there goes to the server's log, not to the stream.
            assert not [e for e in sb.background.events if "FORGED" in json.dumps(e)]
        # gVisor does not apply the non-dumpable rule to /proc/<pid>/fd (docs/security.md, item 5): with the attach
        # stream a forged frame can still be written there, and the server's checks keep it inside this session.
        await asyncio.sleep(3)  # the victim's real done, if the forged one came first, is dropped
        done, _ = await call(sb, "ping")
        assert done["ok"]


# ---- item 4 (agent and sandbox part): results count against max_output_bytes; frames stay bounded


async def test_a_huge_result_is_truncated_at_max_output_bytes_and_never_reaches_the_server(engine):
    cap = engine.settings.max_output_bytes
    async with sandbox_of(engine) as sb:
        await call(sb, "run_code", code="big = 'x' * (24 << 20)")
        before = rss()
        peak_rss_reset()
        done, ev = await call(sb, "run_code", code="print('before')\nbig", max_output_bytes=cap)
        grown, peak = rss() - before, peak_rss() - before
        assert done["ok"] and done["truncated"] is True, done
        assert ev.text() == "before\n" and ev.results() == []  # the output before it is kept
        assert peak < 16 << 20, f"the server's peak grew by {peak >> 20} MiB for a 24 MiB result"
        assert grown < 16 << 20
        # A result alone over the cap (a rich repr of 5 kB) is dropped with truncated too.
        done, ev = await call(
            sb,
            "run_code",
            code="class R:\n    def _repr_html_(self): return 'h' * 5000\nR()",
            max_output_bytes=1000,
        )
        assert done["ok"] and done["truncated"] is True and ev.results() == []


async def test_an_exception_of_any_size_ends_with_a_bounded_done(engine):
    async with sandbox_of(engine) as sb:
        before = rss()
        peak_rss_reset()
        done, _ = await call(sb, "run_code", code="raise ValueError('x' * (48 << 20))")
        peak = peak_rss() - before
        assert not done["ok"] and done["error"]["name"] == "ValueError"
        assert len(done["error"]["message"]) < 100_000 and "more characters" in done["error"]["message"]
        assert len(done["error"]["traceback"]) < 100_000
        assert peak < 16 << 20, f"the server's peak grew by {peak >> 20} MiB"


async def test_a_large_cell_cut_short_by_a_restart_never_reaches_the_next_worker(engine):
    """A cell too big for the pipe is written by a thread. A restart mid-write closes the old worker's pipe,
    and the new worker's pipe may get the same descriptor number: the old cell's tail must not land in it."""
    big = "x = 0\n" + ("# " + "y" * 1000 + "\n") * 8000 + "'big'"  # 8 MB of comments
    async with sandbox_of(engine) as sb:
        for attempt, delay in enumerate((0.001, 0.003, 0.005, 0.01, 0.02, 0.03) * 2):
            ctx = f"big-{attempt}"
            assert (await call(sb, "create_context", language="python", context=ctx))[0]["ok"]
            assert (await call(sb, "run_code", context=ctx, code="1 + 1"))[0]["ok"]
            running = asyncio.ensure_future(sb.request("run_code", {"context": ctx, "code": big}, None))
            await asyncio.sleep(delay)
            restarted = (await call(sb, "restart_context", context=ctx))[0]
            assert restarted["ok"], restarted
            await running  # its done, whichever it is
            for i in range(3):
                done, ev = await call(sb, "run_code", context=ctx, code=f"{i} + 40")
                assert done["ok"], json.dumps(done)
                assert [r["data"]["text/plain"] for r in ev.results()] == [str(i + 40)]
            await call(sb, "delete_context", context=ctx)
