"""Fresh contexts from spares made ahead (issue 15, part 2), in real sandboxes under runc and runsc.

A Python context's worker is forked by the agent's zygote; a JavaScript context's is a node started
ahead. Each must still be a clean interpreter of its own, with the cwd and env it was created with,
and interrupts, timeouts, kills and the memory guard must still reach it.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.engine import Engine
from support.collect import call, sandbox_of
from support.env import sandbox_settings

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
DEADLINE = 60.0

# What a worker says about itself: its parent's command line tells a forked worker (the zygote's
# child) from a spawned one (the agent's child).
WHO = """
import os, json
with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
    parent = f.read().replace(b"\\0", b" ").decode()
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "parent": parent, "cwd": os.getcwd(),
                  "foo": os.environ.get("FOO"), "sid": os.getsid(0)}))
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def engine(request):
    settings = sandbox_settings(pool_size=0, runtime=request.param)
    eng = Engine(DockerBackend(settings), settings)
    await eng.start()
    yield eng
    await eng.close()


async def value(sb, context: str, code: str):
    done, ev = await call(sb, "run_code", context=context, code=code)
    assert done["ok"], done
    return ev.results()[-1]["data"]["text/plain"] if ev.results() else None


async def who(sb, context: str) -> dict:
    done, ev = await call(sb, "run_code", context=context, code=WHO)
    assert done["ok"], (done, sb.background.events)
    return json.loads(ev.text())


async def forked_context(sb, name: str, tolerate_guard: bool = False, **params) -> dict:
    """Create a Python context, waiting (a bounded number of tries) until the zygote has a spare for it."""
    for attempt in range(100):
        done, _ = await call(sb, "create_context", language="python", context=f"{name}-{attempt}", **params)
        assert done["ok"], done
        done, ev = await call(sb, "run_code", context=f"{name}-{attempt}", code=WHO)
        if not done["ok"]:
            # Only right after a memory bomb under gVisor: the guard may take a new worker too while the
            # Sentry has not yet freed the bomb's memory (seconds, under load). Anything else is a failure.
            assert done["error"]["name"] == "WorkerDied" and tolerate_guard, done
            await call(sb, "delete_context", context=f"{name}-{attempt}")
            await asyncio.sleep(0.5)
            continue
        me = json.loads(ev.text())
        if "groundloop_agent.zygote" in me["parent"]:
            return dict(me, context=f"{name}-{attempt}")
        await call(sb, "delete_context", context=f"{name}-{attempt}")
        await asyncio.sleep(0.1)  # the zygote starts with the agent: not ready yet
    raise AssertionError("no context was forked by the zygote")


async def test_forked_contexts_are_isolated_from_each_other(engine):
    async with sandbox_of(engine) as sb:
        a = await forked_context(sb, "a")
        b = await forked_context(sb, "b")
        assert a["pid"] != b["pid"] and a["ppid"] == b["ppid"]
        # each in a session of its own, not the zygote's: interrupts and the memory guard are per context
        assert a["sid"] == a["pid"] and b["sid"] == b["pid"]
        await value(sb, a["context"], "secret = 41\nimport json, random\njson.MARK = 'a'")
        assert await value(sb, b["context"], "'secret' in dir()") == "False"
        assert await value(sb, b["context"], "import json\nhasattr(json, 'MARK')") == "False"
        assert await value(sb, a["context"], "secret + 1") == "42"
        # the zygote's generator is reseeded in every child
        ra = await value(sb, a["context"], "import random\nrandom.random()")
        rb = await value(sb, b["context"], "import random\nrandom.random()")
        assert ra != rb
        # the first to go when memory runs out, as a spawned worker is (set once the spare is claimed and
        # dumpable again: before, the kernel gave its /proc files to root and the write failed)
        assert await value(sb, a["context"], "open('/proc/self/oom_score_adj').read().strip()") == "'1000'"
        # and so are a command's processes and their children (before, an exec'd fork bomb's processes and the
        # agent were equal for the OOM killer, which took the agent, the largest, and the sandbox with it)
        done, ev = await call(sb, "exec", command="cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'")
        assert done["ok"] and ev.text() == "1000\n1000\n", (done, ev.text())
        # a clean __main__, and none of the agent's modules
        assert await value(sb, b["context"], "__name__") == "'__main__'"
        assert await value(sb, b["context"], "import sys\n[m for m in sys.modules if 'groundloop' in m]") == "[]"


async def test_cwd_env_and_umask_of_create_context_apply_to_a_forked_worker(engine):
    async with sandbox_of(engine) as sb:
        await call(sb, "exec", command="mkdir -p /workspace/sub")
        me = await forked_context(sb, "env", cwd="sub", env={"FOO": "bar"})
        assert me["cwd"] == "/workspace/sub" and me["foo"] == "bar"
        # a child process of the cell gets the context's env too
        assert await value(sb, me["context"], "import subprocess\nsubprocess.run(['sh', '-c', 'echo $FOO'], capture_output=True, text=True).stdout") == "'bar\\n'"  # fmt: skip
        assert await value(sb, me["context"], "import os\nos.path.exists('/workspace/sub')") == "True"
        plain = await forked_context(sb, "plain")
        assert plain["cwd"] == "/workspace" and plain["foo"] is None


async def test_an_env_that_changes_how_python_starts_gets_a_spawned_worker(engine):
    async with sandbox_of(engine) as sb:
        await forked_context(sb, "warm")  # the zygote is up
        done, _ = await call(
            sb, "create_context", language="python", context="pp", env={"PYTHONPATH": "/workspace/lib"}
        )
        assert done["ok"], done
        me = await who(sb, "pp")
        assert "zygote" not in me["parent"]
        assert await value(sb, "pp", "import sys\n'/workspace/lib' in sys.path") == "True"


async def test_interrupt_timeout_and_kill_reach_a_forked_worker(engine):
    async with sandbox_of(engine) as sb:
        me = await forked_context(sb, "int")
        ctx = me["context"]
        await value(sb, ctx, "kept = 7")
        done, _ = await call(sb, "run_code", context=ctx, code="while True: pass", timeout_s=0.5)
        assert done["error"]["name"] == "Timeout" and done["state_lost"] is False, done
        assert await value(sb, ctx, "kept") == "7"
        code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
        done, _ = await call(sb, "run_code", context=ctx, code=code, timeout_s=0.5)
        assert done["error"]["name"] == "Timeout" and done["state_lost"] is True, done
        assert await value(sb, ctx, "'kept' in dir()") == "False"
        # a worker that dies is buried: its exit status comes from the zygote
        done, _ = await call(sb, "run_code", context=ctx, code="import os\nos._exit(3)")
        assert done["error"]["name"] == "WorkerDied" and "exit code 3" in done["error"]["message"], done
        assert await value(sb, ctx, "1 + 1") == "2"
        # cancel of a running cell
        sb_req = asyncio.ensure_future(call(sb, "run_code", context=ctx, code="import time\ntime.sleep(30)"))
        await asyncio.sleep(0.5)
        listed, _ = await call(sb, "list_contexts")
        assert any(c["context_id"] == ctx for c in listed["contexts"])
        await call(sb, "delete_context", context=ctx)
        done, _ = await sb_req
        assert not done["ok"] and done["error"]["name"] == "ContextNotFound", done


MEMORY_BOMB = """
hog = []
while True:
    hog.append(bytearray(8 << 20))
    hog[-1][::4096] = b'x' * len(hog[-1][::4096])
"""


async def test_a_memory_bomb_in_a_forked_worker_takes_only_that_worker(engine):
    async with sandbox_of(engine) as sb:
        me = await forked_context(sb, "bomb")
        other = await forked_context(sb, "bystander")
        await value(sb, other["context"], "mine = 'safe'")
        done, _ = await call(sb, "run_code", context=me["context"], code=MEMORY_BOMB, timeout_s=30)
        # runc: the OOM killer takes the worker (oom_score_adj 1000); runsc: the agent's memory guard does
        assert not done["ok"] and done["error"]["name"] in ("WorkerDied", "MemoryError"), done
        assert await value(sb, me["context"], "1 + 1") == "2"
        assert await value(sb, other["context"], "mine") == "'safe'"
        # and the zygote still forks
        await forked_context(sb, "after", tolerate_guard=True)


async def test_a_dead_zygote_does_not_break_contexts(engine):
    async with sandbox_of(engine) as sb:
        me = await forked_context(sb, "z")
        await value(sb, me["context"], "here = 1")
        await value(sb, me["context"], "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        # the orphaned worker keeps its state
        assert await value(sb, me["context"], "here") == "1"
        # new contexts work at once (spawned while there is no zygote), then come from a new zygote
        for i in range(3):
            done, _ = await call(sb, "create_context", language="python", context=f"n{i}")
            assert done["ok"], done
            assert await value(sb, f"n{i}", "6 * 7") == "42"
        again = await forked_context(sb, "again")
        assert again["ppid"] != me["ppid"]
        # an orphan's end is still seen: the context is restarted, with an unknown status
        done, _ = await call(sb, "run_code", context=me["context"], code="import os\nos._exit(0)")
        assert done["error"]["name"] == "WorkerDied", done
        assert await value(sb, me["context"], "1 + 1") == "2"


async def test_javascript_contexts_from_spares_are_isolated_and_take_cwd_and_env(engine):
    async with sandbox_of(engine) as sb:
        await call(sb, "exec", command="mkdir -p /workspace/js")
        ages = []
        for i in range(6):
            cid = f"js{i}"
            done, _ = await call(
                sb, "create_context", language="javascript", context=cid, cwd="js", env={"FOO": f"v{i}"}
            )
            assert done["ok"], done
            done, ev = await call(sb, "run_code", context=cid, code="typeof leaked")
            assert ev.results()[-1]["data"]["text/plain"] == "undefined", (i, ev.results())
            code = "globalThis.leaked = 1; JSON.stringify([process.cwd(), process.env.FOO, process.uptime()])"
            done, ev = await call(sb, "run_code", context=cid, code=code)
            assert done["ok"], done
            cwd, foo, uptime = json.loads(ev.results()[-1]["data"]["text/plain"])
            assert (cwd, foo) == ("/workspace/js", f"v{i}")
            ages.append(uptime)
            await call(sb, "delete_context", context=cid)
            if uptime > 2:
                break
            await asyncio.sleep(2.5)  # room for a spare to start, and to be older than any spawn
        # at least one came from a spare: started seconds before its context was created
        assert max(ages) > 2, ages


async def test_an_env_too_big_for_a_claim_gets_a_spawned_worker_with_all_of_it(engine):
    async with sandbox_of(engine) as sb:
        await forked_context(sb, "warm")
        big = "x" * (100 << 10)
        done, _ = await call(sb, "create_context", language="python", context="big", env={"BIG": big})
        assert done["ok"], done
        assert await value(sb, "big", "import os\nlen(os.environ['BIG'])") == str(100 << 10)
        # the spares were not spent on it
        again = await forked_context(sb, "after-big")
        assert "zygote" in again["parent"]


async def test_fresh_runs_back_to_back_each_get_a_forked_worker_and_are_cleaned_up(engine):
    """A grounded loop asks for clean contexts faster than the zygote forks spares (2 at a time): a context
    waits a moment for the fork on its way rather than spawning a whole interpreter; each fresh run's
    context is gone after it."""
    async with sandbox_of(engine) as sb:
        await forked_context(sb, "warm")  # the zygote is up
        parents, contexts = [], set()
        for _ in range(12):
            done, ev = await call(sb, "run_code", code=WHO, fresh=True)
            assert done["ok"], done
            parents.append(json.loads(ev.text())["parent"])
            contexts.add(done["context"])
        assert all("groundloop_agent.zygote" in p for p in parents), parents
        assert len(contexts) == 12 and all(c.startswith("fresh-") for c in contexts)
        for _ in range(100):
            done, _ = await call(sb, "list_contexts")
            listed = {c["context_id"] for c in done["contexts"]}
            if not listed & contexts:
                break
            await asyncio.sleep(0.05)
        assert not listed & contexts, listed
