"""The sandbox engine against a real Docker engine: agent ops, streaming, faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest
import pytest_asyncio
from groundloop.sandbox.base import SandboxLost, SandboxUnavailable
from groundloop.sandbox.docker_backend import DockerBackend
from groundloop.sandbox.engine import Engine
from support.env import sandbox_settings

# One engine (and warm pool) for the module; each test takes a fresh sandbox.
pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    settings = sandbox_settings(pool_size=2)
    eng = Engine(DockerBackend(settings), settings)
    await eng.start()
    yield eng
    await eng.close()


@pytest_asyncio.fixture(loop_scope="module")
async def sandbox(engine):
    sb = await engine.acquire()
    yield sb
    await engine.release(sb)


WAIT = 60  # generous bound for events on a loaded 2-core CI machine


async def run(sb, code, collector=None, **params):
    return await sb.request("run_code", {"code": code, **params}, collector)


# ---- code contexts


async def test_python_context_keeps_state(sandbox, collect):
    assert (await run(sandbox, "import os\nx = 41\nos.makedirs('sub', exist_ok=True)\nos.chdir('sub')"))["ok"]
    c = collect()
    done = await run(sandbox, "x + 1", c)
    assert done["ok"] and c.results()[0]["data"]["text/plain"] == "42" and c.results()[0]["main"]
    c = collect()
    await run(sandbox, "print(os.getcwd())", c)
    assert c.text() == "/workspace/sub\n"


async def test_javascript_context_keeps_state(sandbox, collect):
    assert (await run(sandbox, "var total = 40; let k = 2;", language="javascript"))["ok"]
    c = collect()
    done = await run(sandbox, "console.log('sum', total + k); ({sum: total + k})", c, language="javascript")
    assert done["ok"], done
    assert c.text() == "sum 42\n"
    assert c.results()[0]["data"]["application/json"] == {"sum": 42}


async def test_mime_bundle(sandbox, collect):
    code = (
        "import base64\n"
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>bold</b>'\n"
        "    def _repr_png_(self): return b'\\x89PNG fake'\n"
        "    def __repr__(self): return 'Rich()'\n"
        "Rich()"
    )
    c = collect()
    assert (await run(sandbox, code, c))["ok"]
    data = c.results()[0]["data"]
    assert data["text/plain"] == "Rich()"
    assert data["text/html"] == "<b>bold</b>"
    assert base64.b64decode(data["image/png"]) == b"\x89PNG fake"
    c = collect()
    await run(sandbox, "{'a': [1, 2]}", c)
    assert c.results()[0]["data"]["application/json"] == {"a": [1, 2]}


async def test_errors_have_name_message_traceback(sandbox, collect):
    done = await run(sandbox, "def f():\n    raise ValueError('bad value')\nf()")
    assert not done["ok"]
    err = done["error"]
    assert err["name"] == "ValueError" and err["message"] == "bad value"
    assert "line 2, in f" in err["traceback"] and "pyworker" not in err["traceback"]
    done = await run(sandbox, "def broken(:\n  pass")
    assert done["error"]["name"] == "SyntaxError"
    done = await run(sandbox, "throw new TypeError('nope')", language="javascript")
    assert done["error"]["name"] == "TypeError" and done["error"]["message"] == "nope"


async def test_contexts_create_list_delete(sandbox):
    done = await sandbox.request("create_context", {"language": "python", "cwd": "/tmp", "env": {"GREETING": "hi"}})
    cid = done["context_id"]
    c_events = []

    async def grab(ev):
        c_events.append(ev)

    assert (await run(sandbox, "import os\nprint(os.getcwd(), os.environ['GREETING'])", grab, context=cid))["ok"]
    assert c_events[0]["lines"] == ["/tmp hi\n"]
    listed = await sandbox.request("list_contexts")
    assert cid in [c["context_id"] for c in listed["contexts"]]
    assert (await sandbox.request("delete_context", {"context": cid}))["ok"]
    done = await run(sandbox, "1", context=cid)
    assert done["error"]["name"] == "ContextNotFound"


# ---- streaming


async def test_lines_stream_as_written(sandbox):
    """The first line arrives while the cell still runs: the cell waits for a
    file that the test writes only after it has seen that line."""
    seen = asyncio.Event()
    lines = []

    async def on_event(ev):
        if ev["ev"] == "out":
            lines.extend(ev["lines"])
            if "first\n" in lines:
                seen.set()

    code = "import os, time\nprint('first')\nwhile not os.path.exists('/tmp/go'): time.sleep(0.005)\nprint('second')"
    task = asyncio.create_task(run(sandbox, code, on_event))
    await asyncio.wait_for(seen.wait(), WAIT)
    assert lines == ["first\n"]
    assert (await sandbox.request("write_file", {"path": "/tmp/go", "content": ""}))["ok"]
    done = await asyncio.wait_for(task, WAIT)
    assert done["ok"] and lines == ["first\n", "second\n"]


async def test_exec_streams_as_written(sandbox):
    seen = asyncio.Event()

    async def on_event(ev):
        if ev["ev"] == "out" and "ready\n" in ev["lines"]:
            seen.set()

    task = asyncio.create_task(
        sandbox.request(
            "exec", {"command": "echo ready; while [ ! -e /tmp/go2 ]; do sleep 0.01; done; echo end"}, on_event
        )
    )
    await asyncio.wait_for(seen.wait(), WAIT)
    await sandbox.request("exec", {"command": "touch /tmp/go2"})
    done = await asyncio.wait_for(task, WAIT)
    assert done["ok"] and done["exit_code"] == 0


async def test_output_is_byte_exact_and_invalid_utf8_is_replaced(sandbox, collect):
    c = collect()
    code = (
        "import sys\nsys.stdout.write('tab\\there  é😀\\r\\n')\nsys.stdout.flush()\n"
        "sys.stdout.buffer.write(b'bad \\xff\\xfe end\\n')\nsys.stdout.write('no newline')"
    )
    assert (await run(sandbox, code, c))["ok"]
    assert c.lines() == ["tab\there  é😀\r\n", "bad \ufffd\ufffd end\n", "no newline"]


async def test_stderr_is_separate(sandbox, collect):
    c = collect()
    await run(sandbox, "import sys\nprint('out')\nprint('err', file=sys.stderr)", c)
    assert c.text("stdout") == "out\n" and c.text("stderr") == "err\n"


async def test_long_line_is_split(sandbox, collect):
    c = collect()
    await run(sandbox, "print('x' * 40000)", c)
    lines = c.lines()
    assert "".join(lines) == "x" * 40000 + "\n"
    assert len(lines) == 3 and all(len(ln.encode()) <= 16 * 1024 for ln in lines)


async def test_multibyte_char_is_not_cut_by_a_split(sandbox, collect):
    c = collect()
    await run(sandbox, "print('é' * 20000)", c)  # 40000 bytes: splits fall inside characters
    assert "".join(c.lines()) == "é" * 20000 + "\n"


async def test_flood_is_truncated(sandbox, collect):
    c = collect()
    done = await run(sandbox, "for i in range(200000): print(i)", c, max_output_bytes=50_000)
    assert done["ok"] and done["truncated"] is True
    text = c.text()
    assert len(text.encode()) <= 50_000
    assert text.startswith("0\n1\n2\n") and text.count("\n") == len(c.lines())


# ---- exec and files


async def test_exec_cwd_env_exit_code(sandbox, collect):
    c = collect()
    done = await sandbox.request("exec", {"command": "pwd; echo $FOO; exit 7", "cwd": "/tmp", "env": {"FOO": "bar"}}, c)
    assert done["exit_code"] == 7 and c.lines() == ["/tmp\n", "bar\n"]


async def test_files(sandbox):
    assert (await sandbox.request("mkdir", {"path": "data/deep"}))["ok"]
    assert (await sandbox.request("write_file", {"path": "data/a.txt", "content": "héllo\n"}))["ok"]
    raw = bytes(range(256))
    done = await sandbox.request(
        "write_file", {"path": "data/b.bin", "content": base64.b64encode(raw).decode(), "encoding": "base64"}
    )
    assert done["size"] == 256
    got = await sandbox.request("read_file", {"path": "data/a.txt"})
    assert got["content"] == "héllo\n" and got["encoding"] == "utf-8"
    got = await sandbox.request("read_file", {"path": "/workspace/data/b.bin"})
    assert got["encoding"] == "base64" and base64.b64decode(got["content"]) == raw
    listing = await sandbox.request("list_files", {"path": "data"})
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("a.txt", "file"),
        ("b.bin", "file"),
        ("deep", "directory"),
    ]
    assert (await sandbox.request("delete_file", {"path": "data/a.txt"}))["ok"]
    missing = await sandbox.request("read_file", {"path": "data/a.txt"})
    assert missing["error"]["name"] == "FileNotFoundError"
    bad = await sandbox.request("write_file", {"path": "x", "content": "@@", "encoding": "base64"})
    assert bad["error"]["name"] == "ValueError"


async def test_file_size_cap(sandbox):
    done = await sandbox.request("write_file", {"path": "big", "content": "x" * 2000, "max_file_bytes": 1000})
    assert done["error"]["name"] == "FileTooLarge"


# ---- background processes


async def test_background_process_streams_and_is_killed_with_its_tree(sandbox):
    events: list[dict] = []
    got_line = asyncio.Event()
    exited = asyncio.Event()

    async def listener(ev):
        events.append(ev)
        if ev["ev"] == "pout":
            got_line.set()
        if ev["ev"] == "pexit":
            exited.set()

    sandbox.set_listener(listener)
    # The child sleeps in a subshell: killing only the shell would leave it.
    done = await sandbox.request("start_process", {"command": "echo started; (sleep 1000; echo never) & wait"})
    pid = done["process_id"]
    await asyncio.wait_for(got_line.wait(), WAIT)
    listed = await sandbox.request("list_processes")
    assert [p["running"] for p in listed["processes"] if p["process_id"] == pid] == [True]
    assert (await sandbox.request("kill_process", {"process_id": pid}))["ok"]
    await asyncio.wait_for(exited.wait(), WAIT)
    c = []

    async def grab(ev):
        c.extend(ev.get("lines", []))

    await sandbox.request("exec", {"command": "for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null; echo; done"}, grab)
    assert not any("sleep" in line and "1000" in line for line in c)
    out = [ln for ev in events if ev["ev"] == "pout" for ln in ev["lines"]]
    assert out == ["started\n"]


# ---- interrupt, timeout, crash


async def test_timeout_interrupts_and_keeps_state(sandbox):
    await run(sandbox, "kept = 'yes'")
    done = await run(sandbox, "import time\nwhile True: time.sleep(0.01)", timeout_s=0.5)
    assert done["error"]["name"] == "Timeout" and done["state_lost"] is False
    c = []

    async def grab(ev):
        c.append(ev)

    await run(sandbox, "kept", grab)
    assert c[0]["data"]["text/plain"] == "'yes'"


async def test_timeout_kills_a_worker_that_ignores_sigint(sandbox):
    await run(sandbox, "kept = 1")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    done = await run(sandbox, code, timeout_s=0.5)
    assert done["error"]["name"] == "Timeout" and done["state_lost"] is True
    assert "state was lost" in done["error"]["message"]
    after = await run(sandbox, "kept")
    assert after["error"]["name"] == "NameError"  # a fresh context: usable, state gone


async def test_cancel(sandbox):
    task = asyncio.create_task(sandbox.request("run_code", {"code": "import time\ntime.sleep(1000)"}, rid="long"))
    await asyncio.sleep(0.2)
    sandbox.cancel("long")
    done = await asyncio.wait_for(task, WAIT)
    assert done["error"]["name"] == "Cancelled"


async def test_cancel_of_a_queued_run_never_reaches_the_worker(sandbox, collect):
    busy = asyncio.create_task(run(sandbox, "import time\ntime.sleep(0.5)"))
    await asyncio.sleep(0.1)
    out = collect()
    queued = asyncio.create_task(sandbox.request("run_code", {"code": "print('ran')"}, out, rid="queued"))
    await asyncio.sleep(0.1)
    sandbox.cancel("queued")
    done = await asyncio.wait_for(queued, WAIT)
    assert done["error"]["name"] == "Cancelled" and "before it started" in done["error"]["message"]
    assert (await busy)["ok"] and out.text() == ""


async def test_runs_keep_their_order_from_a_cold_context(engine, collect):
    sb = await engine.acquire()  # a new sandbox: its default context does not exist yet
    try:
        runs = [asyncio.create_task(run(sb, f"order = globals().get('order', []) + [{i}]")) for i in range(6)]
        dones = await asyncio.wait_for(asyncio.gather(*runs), WAIT)
        assert all(d["ok"] for d in dones)
        out = collect()
        assert (await run(sb, "print(order)", out))["ok"]
        assert out.text() == "[0, 1, 2, 3, 4, 5]\n"
    finally:
        await engine.release(sb)


async def test_worker_crash_restarts_context(sandbox):
    await run(sandbox, "kept = 1")
    done = await run(sandbox, "import os\nos.kill(os.getpid(), 9)")
    assert done["error"]["name"] == "WorkerDied" and done["state_lost"] is True
    assert "SIGKILL" in done["error"]["message"]
    assert (await run(sandbox, "2 + 2"))["ok"]


async def test_concurrent_requests_in_separate_contexts(sandbox):
    ctx = (await sandbox.request("create_context", {"language": "python"}))["context_id"]
    slow = asyncio.create_task(run(sandbox, "import time\ntime.sleep(0.5)\n'slow'", context=ctx))
    fast = await run(sandbox, "'fast'")  # default context: not blocked by the other one
    assert fast["ok"] and not slow.done()
    assert (await slow)["ok"]


async def test_killed_container_fails_requests_clearly(engine):
    sb = await engine.acquire()
    lost = asyncio.Event()

    async def listener(ev):
        if ev["ev"] == "lost":
            lost.set()

    sb.set_listener(listener)
    task = asyncio.create_task(sb.request("run_code", {"code": "import time\ntime.sleep(1000)"}))
    await asyncio.sleep(0.2)
    await engine.backend.kill(sb)
    with pytest.raises(SandboxLost):
        await asyncio.wait_for(task, WAIT)
    await asyncio.wait_for(lost.wait(), WAIT)
    with pytest.raises(SandboxLost):
        await sb.request("ping")
    fresh = await engine.replace(sb)
    assert (await fresh.request("ping"))["ok"]
    await engine.release(fresh)


async def test_agent_killed(engine):
    sb = await engine.acquire()
    with pytest.raises(SandboxLost):
        # PID 1 is the agent's own init; the agent is its child. Killing it ends the container.
        await asyncio.wait_for(sb.request("exec", {"command": "kill -9 $PPID; sleep 5"}), WAIT)
    await engine.release(sb)


async def test_a_sandbox_being_removed_is_counted_until_its_container_is_gone(engine):
    sb = await engine.acquire()
    seen = []
    release = asyncio.create_task(engine.release(sb))
    while not release.done():
        seen.append(engine.counts()["removing"])
        await asyncio.sleep(0)
    await release
    assert 1 in seen  # counted while the container was being removed
    assert engine.counts()["removing"] == 0
    assert engine.status()["states"]["removing"] == 0


async def lone_engine() -> tuple[Engine, DockerBackend]:
    """An engine of its own with no pool (a test that closes it)."""
    settings = sandbox_settings(pool_size=0)
    backend = DockerBackend(settings)
    eng = Engine(backend, settings)
    await eng.start()
    return eng, backend


def containers_of(backend: DockerBackend) -> list:
    """The containers, running or not, that this backend started and are still there."""
    import docker

    with contextlib.closing(docker.from_env()) as client:
        return client.api.containers(all=True, filters={"label": f"groundloop.instance={backend.instance}"})


async def cold_start_in_flight(eng: Engine) -> asyncio.Task:
    acquire = asyncio.create_task(eng.acquire())
    while eng.status()["starting"] == 0:
        await asyncio.sleep(0)
    return acquire


async def test_close_waits_for_a_removal_in_flight():
    """A session's release still removing its container when the server shuts down: close waits for it, so the
    backend is not closed under it and no container is left."""
    eng, backend = await lone_engine()
    sb = await eng.acquire()
    release = asyncio.create_task(eng.release(sb))
    while eng.counts()["removing"] == 0:
        await asyncio.sleep(0)
    await eng.close()
    assert eng.counts()["removing"] == 0
    assert release.done() and release.exception() is None
    assert containers_of(backend) == []


async def test_close_waits_for_a_cold_start_in_flight():
    """A session's cold start still running when the server shuts down: close waits for it, the start ends with
    SandboxUnavailable and its container is removed before the backend closes."""
    eng, backend = await lone_engine()
    acquire = await cold_start_in_flight(eng)
    await eng.close()
    assert acquire.done()
    with pytest.raises(SandboxUnavailable):
        acquire.result()
    assert eng.status()["starting"] == 0 and eng.counts()["removing"] == 0
    assert containers_of(backend) == []


async def test_close_is_not_held_by_a_start_cancelled_while_it_waits(caplog):
    """A cold start cancelled (its session gone) while close waits for it: close goes on when the start has undone
    itself, not at its deadline."""
    eng, backend = await lone_engine()
    acquire = await cold_start_in_flight(eng)
    closing = asyncio.create_task(eng.close())
    await asyncio.sleep(0)
    acquire.cancel()
    with caplog.at_level("WARNING", logger="groundloop.sandbox"):
        await closing
    assert "still running at close" not in caplog.text
    assert acquire.cancelled() or isinstance(acquire.exception(), SandboxUnavailable)
    assert containers_of(backend) == []
