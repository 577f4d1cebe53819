"""The in-container agent without Docker: the same agent package run as a local subprocess
(the local backend), driven through the server's own Sandbox reader. Seconds, no Docker marker."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil

import pytest
from groundloop.sandbox.local_backend import LocalBackend
from groundloop.sandbox.settings import SandboxSettings
from support.collect import Collector as Events


@pytest.fixture
async def sb():
    backend = LocalBackend(SandboxSettings(backend="local"))
    sandbox = await backend.start("test-agent-local")
    events = Events()
    sandbox.set_listener(events)
    sandbox.background = events  # pout/pexit land here
    yield sandbox
    await sandbox.close()
    await backend.close()


async def run(sb, op: str, **params) -> tuple[dict, Events]:
    ev = Events()
    done = await sb.request(op, params, ev, deadline_s=60)
    return done, ev


async def test_hello_names_the_agent_and_its_languages(sb):
    assert sb.hello["agent"] == 1
    assert "python" in sb.hello["languages"]
    assert os.path.isdir(sb.hello["workdir"])


async def test_run_code_python_output_result_and_state(sb):
    done, ev = await run(sb, "run_code", code="x = 6\nprint('a')\nimport sys; print('b', file=sys.stderr)\nx * 7")
    assert done["ok"] and done["context"] == "default-python"
    assert ev.text() == "a\n" and ev.text("stderr") == "b\n"
    assert ev.results() and ev.results()[-1]["data"]["text/plain"] == "42" and ev.results()[-1]["main"]
    done, ev = await run(sb, "run_code", code="x + 1")
    assert ev.results()[-1]["data"]["text/plain"] == "7"
    done, ev = await run(sb, "run_code", code="1/0")
    assert not done["ok"] and done["error"]["name"] == "ZeroDivisionError"
    assert "<cell-" in done["error"]["traceback"]


async def test_the_agents_modules_do_not_shadow_user_modules(sb):
    # The worker's folder holds the agent's modules (files.py, wire.py...): a user's module of the same name wins.
    await run(sb, "write_file", path="files.py", content="WHO = 'user'\n")
    done, ev = await run(sb, "run_code", code="import files; files.WHO")
    assert done["ok"], done
    assert ev.results()[-1]["data"]["text/plain"] == "'user'"


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
async def test_run_code_javascript(sb):
    done, ev = await run(sb, "run_code", language="javascript", code="let y = 20; console.log('hi'); y + 22")
    assert done["ok"], done
    assert ev.text() == "hi\n" and ev.results()[-1]["data"]["text/plain"] == "42"


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
async def test_a_javascript_value_whose_inspection_throws_still_ends_its_run(sb):
    """util.inspect calls the value's own inspect.custom: its throw once left the worker's command queue
    rejected, so every later run of the context waited for its timeout without a done."""
    cell = "({ [Symbol.for('nodejs.util.inspect.custom')]() { throw new Error('no') } })"
    done, ev = await run(sb, "run_code", language="javascript", code=cell)
    assert done["ok"], done
    assert "inspection failed: no" in ev.results()[-1]["data"]["text/plain"]
    thrown = "throw { [Symbol.for('nodejs.util.inspect.custom')]() { throw 1 } }"
    done, ev = await run(sb, "run_code", language="javascript", code=thrown)
    assert not done["ok"] and done["error"]["name"] == "Error", done
    done, ev = await run(sb, "run_code", language="javascript", code="'still here'")
    assert done["ok"] and ev.results()[-1]["data"]["text/plain"] == "still here"


async def test_exec_exit_code_and_output_cap(sb):
    done, ev = await run(sb, "exec", command="echo out; echo err >&2; exit 3")
    assert done["ok"] and done["exit_code"] == 3
    assert ev.text() == "out\n" and ev.text("stderr") == "err\n"
    done, ev = await run(sb, "exec", command="yes | head -c 100000", max_output_bytes=1000)
    assert done["truncated"] is True and len(ev.text()) <= 1000


async def test_contexts_create_list_delete(sb):
    done, _ = await run(sb, "create_context", language="python", context="c1")
    assert done["ok"] and done["context_id"] == "c1"
    await run(sb, "run_code", context="c1", code="v = 'mine'")
    done, ev = await run(sb, "run_code", code="'v' in dir()")
    assert ev.results()[-1]["data"]["text/plain"] == "False"  # the default context is another one
    done, _ = await run(sb, "list_contexts")
    assert {"c1", "default-python"} <= {c["context_id"] for c in done["contexts"]}
    done, _ = await run(sb, "delete_context", context="c1")
    assert done["ok"]
    done, _ = await run(sb, "run_code", context="c1", code="1")
    assert not done["ok"] and done["error"]["name"] == "ContextNotFound"


async def test_files_round_trip(sb):
    done, _ = await run(sb, "write_file", path="d/a.txt", content="héllo")
    assert done["ok"] and done["size"] == len("héllo".encode())
    done, _ = await run(sb, "read_file", path="d/a.txt")
    assert done["content"] == "héllo" and done["encoding"] == "utf-8"
    await run(sb, "write_file", path="d/b.bin", content="/w==", encoding="base64")
    done, _ = await run(sb, "read_file", path="d/b.bin")
    assert done["encoding"] == "base64" and done["content"] == "/w=="
    done, _ = await run(sb, "list_files", path="d")
    assert [(e["name"], e["type"]) for e in done["entries"]] == [("a.txt", "file"), ("b.bin", "file")]
    done, _ = await run(sb, "mkdir", path="d/e/f")
    assert done["ok"]
    done, _ = await run(sb, "delete_file", path="d")
    assert not done["ok"]  # a directory needs recursive
    done, _ = await run(sb, "delete_file", path="d", recursive=True)
    assert done["ok"]
    done, _ = await run(sb, "read_file", path="d/a.txt")
    assert not done["ok"] and done["error"]["name"] == "FileNotFoundError"


async def test_background_process_output_exit_and_kill(sb):
    done, _ = await run(sb, "start_process", command="echo started; exec sleep 30", process_id="p1")
    assert done["ok"] and done["process_id"] == "p1"
    events = sb.background
    for _ in range(200):
        if any(e.get("ev") == "pout" for e in events.events):
            break
        await asyncio.sleep(0.05)
    assert [line for e in events.events if e.get("ev") == "pout" for line in e["lines"]] == ["started\n"]
    done, _ = await run(sb, "list_processes")
    assert done["processes"][0]["running"] is True
    done, _ = await run(sb, "kill_process", process_id="p1")
    assert done["ok"]
    for _ in range(200):
        if any(e.get("ev") == "pexit" for e in events.events):
            break
        await asyncio.sleep(0.05)
    exits = [e for e in events.events if e.get("ev") == "pexit"]
    assert exits and exits[0]["proc"] == "p1" and exits[0]["exit_code"] == 128 + 15


async def test_cancel_interrupts_a_run_and_keeps_state(sb):
    await run(sb, "run_code", code="kept = 5")
    ev = Events()
    fut = sb.submit("run_code", {"code": "import time\nprint('go', flush=True)\nwhile True: time.sleep(0.01)"}, ev)
    for _ in range(200):
        if ev.text():
            break
        await asyncio.sleep(0.05)
    sb.cancel(next(iter(sb._pending)))
    done = await asyncio.wait_for(fut, 30)
    assert not done["ok"] and done["error"]["name"] == "Cancelled"
    done, ev = await run(sb, "run_code", code="kept")
    assert ev.results()[-1]["data"]["text/plain"] == "5"


async def test_timeout_of_a_run(sb):
    done, _ = await run(sb, "run_code", code="import time; time.sleep(30)", timeout_s=0.5)
    assert not done["ok"] and done["error"]["name"] == "Timeout"


async def test_unknown_op_and_ping(sb):
    done, _ = await run(sb, "nonsense")
    assert not done["ok"] and done["error"]["name"] == "UnknownOp"
    done, _ = await run(sb, "ping")
    assert done["ok"] and done["pong"] is True


async def test_a_cell_that_closes_its_stdio_leaves_the_context_usable(sb):
    done, _ = await run(sb, "run_code", code="import os\nos.close(1)\nos.close(2)")
    assert done["ok"], done
    done, ev = await run(sb, "run_code", code="import sys\nprint('back')\nprint('err', file=sys.stderr)")
    assert done["ok"] and ev.text() == "back\n" and ev.text("stderr") == "err\n"
    done, _ = await run(sb, "run_code", code="import sys\nsys.stdout.close()")
    done, ev = await run(sb, "run_code", code="print('again')")
    assert done["ok"] and ev.text() == "again\n"


CLOSE_EVERY_COPY_OF_STDIO = """
import os
pipes = {os.readlink(f"/proc/self/fd/{n}") for n in (1, 2)}
for name in os.listdir("/proc/self/fd"):
    try:
        if os.readlink(f"/proc/self/fd/{name}") in pipes:
            os.close(int(name))
    except OSError:
        pass
"""


async def test_a_worker_pipe_closed_at_its_end_is_not_closed_again_under_a_new_owner(sb):
    # The agent closes a worker's output pipe when it reads its end, and again when the context stops the
    # worker. In between, its number can go to another pipe (here a background process's stdout): the
    # second close must not take that one (it took a spare's socket in the flake of issue 15's last CI run).
    done, _ = await run(sb, "run_code", code="1")
    assert done["ok"], done
    await asyncio.sleep(0.3)  # the zygote's refill lands (a socket of its own) before the numbers below
    done, _ = await run(sb, "run_code", code=CLOSE_EVERY_COPY_OF_STDIO)
    assert done["ok"], done
    done, _ = await run(sb, "start_process", command="until [ -e go ]; do sleep 0.02; done; echo late", process_id="p")
    assert done["ok"], done
    done, _ = await run(sb, "restart_context", context="default-python")
    assert done["ok"], done
    done, _ = await run(sb, "write_file", path="go", content="")
    assert done["ok"], done
    events = sb.background
    for _ in range(200):
        if any(e.get("ev") == "pexit" for e in events.events):
            break
        await asyncio.sleep(0.05)
    assert [line for e in events.events if e.get("ev") == "pout" for line in e["lines"]] == ["late\n"], events.events
    done, ev = await run(sb, "run_code", code="print('fresh')")
    assert done["ok"] and ev.text() == "fresh\n", done


async def test_restarts_asked_for_together_leave_one_worker(sb):
    # Each waits for the one before it: two that ran at once attached two workers, one of them leaked with
    # its pipes still read (a dead leaked worker then spun the agent's loop).
    done, _ = await run(sb, "create_context", language="bash", context="b")
    assert done["ok"], done
    done, _ = await run(sb, "run_code", context="b", code="true")  # its worker is up: the next run begins at once
    assert done["ok"], done
    running = sb.submit("run_code", {"context": "b", "code": "sleep 30"}, None)
    ev = Events()
    queued = sb.submit("run_code", {"context": "b", "code": "echo queued"}, ev)
    restarts = await asyncio.gather(*(run(sb, "restart_context", context="b") for _ in range(3)))
    assert all(done["ok"] for done, _ in restarts), restarts
    done = await running
    assert done["error"]["name"] == "ContextRestarted", done
    done = await queued  # queued before the restarts: it waits for all three, then runs in the new worker
    assert done["ok"] and ev.text() == "queued\n", (done, ev.events)
    done, ev = await run(sb, "exec", command="ps -o args= --ppid $PPID | grep -c -- '--noprofil[e] --norc'")
    assert done["ok"] and ev.text() == "1\n", (done, ev.text())


def a_sleep() -> str:
    """A sleep no other process on this machine runs (the local backend has no pid namespace of its own)."""
    return f"sleep 61.{secrets.randbelow(10**6):06d}"


async def count(sb, command: str) -> int:
    # The bracket keeps the pattern from matching the shell that runs pgrep.
    pattern = command.replace(".", "[.]", 1)
    done, ev = await run(sb, "exec", command=f"pgrep -fc '{pattern}' || true")
    assert done["ok"], done
    return int(ev.text())


@pytest.mark.parametrize(
    "language, code",
    [("bash", "{sleep} &\nexit 2"), ("python", "import os\nos.system('{sleep} &')\nos._exit(2)")],
)
async def test_a_worker_that_ends_while_its_child_lives_on_ends_its_run(sb, language, code):
    # The child holds the worker's pipes (bash: all of them); the run ends when the worker does, not when the
    # child does (before: at the run's timeout, or never without one), and the child goes with the worker.
    sleep = a_sleep()
    done, _ = await run(sb, "create_context", language=language, context="c")
    assert done["ok"], done
    done, _ = await run(sb, "run_code", context="c", code=code.format(sleep=sleep), timeout_s=30)
    assert not done["ok"] and done["error"]["name"] == "WorkerDied", done
    assert "exit code 2" in done["error"]["message"], done
    assert await count(sb, sleep) == 0
    done, ev = await run(sb, "run_code", context="c", code="echo back" if language == "bash" else "print('back')")
    assert done["ok"] and ev.text() == "back\n", done


async def test_what_an_idle_worker_leaves_goes_when_it_ends(sb):
    sleep = a_sleep()
    code = f"import os, subprocess, threading\nsubprocess.Popen({sleep.split()!r})\nthreading.Timer(1.0, os._exit, (0,)).start()"
    done, _ = await run(sb, "run_code", code=code)
    assert done["ok"], done
    for _ in range(200):  # no run, restart or delete follows: the worker's end alone takes its group
        if await count(sb, sleep) == 0:
            break
        await asyncio.sleep(0.05)
    assert await count(sb, sleep) == 0


async def test_a_worker_that_closes_its_answer_pipe_and_lives_on_is_ended(sb):
    # It can never answer again: its run ends (it waited forever for the worker's exit, past its timeout).
    done, _ = await run(sb, "create_context", language="bash", context="b")
    assert done["ok"], done
    done, _ = await run(sb, "run_code", context="b", code="exec {__gl_res}>&-\nsleep 600", timeout_s=30)
    assert not done["ok"] and done["error"]["name"] == "WorkerDied", done
    done, ev = await run(sb, "run_code", context="b", code="echo back")
    assert done["ok"] and ev.text() == "back\n", done


async def test_a_terminal_program_gets_no_descriptor_of_the_agent(sb):
    done, _ = await run(sb, "run_code", code="1")  # a spare was claimed: the zygote's sockets are in the agent
    assert done["ok"], done
    await asyncio.sleep(0.3)
    done, ev = await run(sb, "open_terminal", terminal="t", command="ls /proc/$$/fd", cols=80, rows=24)
    assert done["ok"], done
    listed = b"".join(base64.b64decode(e["data"]) for e in ev.events if e.get("ev") == "tout").decode()
    assert sorted(int(n) for n in listed.split()) == [0, 1, 2], listed


async def test_files_that_are_not_regular_fail_fast_with_a_clear_error(sb):
    fifo = os.path.join(sb.hello["workdir"], "fifo")
    os.mkfifo(fifo)
    for op, params in (("read_file", {"path": "fifo"}), ("write_file", {"path": "fifo", "content": "x"})):
        done, _ = await run(sb, op, **params)
        assert not done["ok"] and done["error"]["name"] == "NotARegularFile", done
    done, _ = await run(sb, "read_file", path="/proc/self/fd/0")  # the agent's own stdin
    assert not done["ok"] and done["error"]["name"] == "NotARegularFile", done
    done, _ = await run(sb, "ping")
    assert done["ok"]


async def test_an_answer_over_the_frame_bound_becomes_a_clear_error():
    settings = SandboxSettings(backend="local", max_output_bytes=1 << 20, max_file_bytes=3 << 20)
    backend = LocalBackend(settings)
    sb = await backend.start("test-agent-local-frame")
    try:
        # 3 MiB of a character JSON must escape (6 bytes each): 18 MiB as text, over the 10 MiB bound.
        with open(os.path.join(sb.hello["workdir"], "ctl.txt"), "wb") as f:
            f.write(b"\x01" * (3 << 20))
        done, _ = await run(sb, "read_file", path="ctl.txt", encoding="utf-8")
        assert not done["ok"] and done["error"]["name"] == "FrameTooLarge", done
        assert "base64" in done["error"]["message"]
        done, _ = await run(sb, "read_file", path="ctl.txt", encoding="base64")
        assert done["ok"] and done["size"] == 3 << 20
    finally:
        await sb.close()


async def test_a_result_with_nan_or_infinity_keeps_the_sandbox(sb):
    """Review finding: a cell ending in ``[float('nan')]`` was sent as ``application/json`` with a bare NaN,
    which strict JSON (the server's reader) refuses, so the whole sandbox was lost. NaN and Infinity are not
    JSON: such a value comes as ``text/plain`` only, and the context goes on."""
    done, ev = await run(sb, "run_code", code="x = {'mean': float('nan'), 'max': float('inf')}\nx")
    assert done["ok"], done
    data = ev.results()[-1]["data"]
    assert "application/json" not in data and "nan" in data["text/plain"] and "inf" in data["text/plain"]
    done, ev = await run(sb, "run_code", code="[1, 2]")
    assert done["ok"] and ev.results()[-1]["data"]["application/json"] == [1, 2]
    assert sb.alive and not sb.lost_reason
