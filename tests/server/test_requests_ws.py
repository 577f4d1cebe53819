"""Issue 16 over the real WebSocket, under runc and runsc: bash and TypeScript contexts, ES module imports
and top-level await in JavaScript, env per run and per session, restart_context, close_session,
execution counts, the default contexts listed from the start, ready.features, strict fields and the
kind of every error.

One server per runtime (module-scoped); each test opens its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import docker
import pytest
import pytest_asyncio
from groundloop.sessions.protocol import CAPABILITIES
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
SECRET = "s3cret-" + secrets.token_hex(12)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, exec_timeout_s=20.0, start_timeout_s=60.0)
    async with run_server(
        server_settings(sandbox=sb, rate_per_s=1000.0, rate_burst=1000, resume_grace_s=0.5, max_sessions_per_user=32)
    ) as s:
        yield s


@contextlib.asynccontextmanager
async def session(srv):
    async with await WSClient.connect(srv.url, token="tok1") as c:
        yield c


def done_of(frames):
    assert frames[-1]["type"] == "done", frames[-1]
    assert sum(1 for f in frames if f["type"] == "done") == 1
    return frames[-1]


def main_result(frames):
    results = [f for f in frames if f["type"] == "result" and f["main"]]
    return results[-1]["data"]["text/plain"] if results else None


async def call_ok(c: WSClient, type: str, **fields):
    done = await c.call(type, **fields)
    assert done["ok"] is True, done
    return done


def languages(c: WSClient) -> set[str]:
    return {f.split(":", 1)[1] for f in c.ready["features"] if f.startswith("language:")}


async def test_ready_lists_the_features(srv):
    async with session(srv) as c:
        features = c.ready["features"]
        for kind in ("run_code", "restart_context", "close_session", "set_env", "cancel"):
            assert kind in features
        assert set(CAPABILITIES) <= set(features)  # each named in tests/sessions/test_protocol_requests.py
        assert {"python", "javascript", "bash"} <= languages(c)


async def test_default_contexts_are_listed_from_the_start(srv):
    async with session(srv) as c:
        listed = {x["context_id"]: x for x in (await call_ok(c, "list_contexts"))["contexts"]}
        for language in languages(c):
            assert listed[f"default-{language}"]["language"] == language
        assert listed["default-python"]["alive"] is False and listed["default-python"]["runs"] == 0
        await call_ok(c, "delete_context", context="default-bash")  # never started: nothing to delete
        await call_ok(c, "run_code", code="1")
        listed = {x["context_id"]: x for x in (await call_ok(c, "list_contexts"))["contexts"]}
        assert listed["default-python"]["alive"] is True and listed["default-python"]["runs"] == 1


async def test_bash_context_keeps_cd_export_and_functions(srv):
    async with session(srv) as c:
        first = done_of(
            await c.request(
                "run_code",
                language="bash",
                code='mkdir -p sub && cd sub\nexport GREETING=hi\ngreet() { echo "$GREETING from $(pwd)"; }',
            )
        )
        assert first["ok"] and first["exit_code"] == 0 and first["context"] == "default-bash", first
        frames = await c.request("run_code", language="bash", code="greet\nfalse")
        done = done_of(frames)
        assert WSClient.text(frames) == "hi from /workspace/sub\n"
        assert done["ok"] is True and done["exit_code"] == 1 and done["execution_count"] == 2, done
        # a child process sees the exported variable
        frames = await c.request("run_code", language="bash", code="sh -c 'echo \"child: $GREETING\"'")
        assert WSClient.text(frames) == "child: hi\n"


async def test_bash_interrupt_keeps_the_shell(srv):
    async with session(srv) as c:
        await call_ok(c, "run_code", language="bash", code="X=kept")
        stopped = done_of(await c.request("run_code", language="bash", code="sleep 30; echo never", timeout_s=1))
        assert stopped["ok"] is False and stopped["error"]["name"] == "Timeout"
        assert stopped["error"]["kind"] == "request"
        frames = await c.request("run_code", language="bash", code="echo $X")
        assert WSClient.text(frames) == "kept\n"


async def test_javascript_import_and_top_level_await(srv):
    async with session(srv) as c:
        code = (
            'import fs from "node:fs";\n'
            'import { join } from "node:path";\n'
            "const data = await Promise.resolve(fs.readdirSync('/').includes('workspace'));\n"
            "function twice(x) { return 2 * x; }\n"
            "join('a', String(data))"
        )
        frames = await c.request("run_code", language="javascript", code=code)
        assert done_of(frames)["ok"], frames
        assert main_result(frames) == "a/true"
        # bindings of the rewritten cell persist: imports, declarations, functions
        frames = await c.request("run_code", language="javascript", code="[typeof fs.readFileSync, data, twice(21)]")
        assert done_of(frames)["ok"], frames
        assert main_result(frames) == "[ 'function', true, 42 ]"
        # destructuring and classes of an awaiting cell persist too; an error keeps the cell's line number
        code = "const { a, b: [c] } = await Promise.resolve({ a: 1, b: [2] });\nclass K { v() { return a + c; } }"
        assert done_of(await c.request("run_code", language="javascript", code=code))["ok"]
        frames = await c.request("run_code", language="javascript", code="new K().v()")
        assert main_result(frames) == "3"
        bad = done_of(await c.request("run_code", language="javascript", code="await 1;\nnull.x"))["error"]
        assert bad["name"] == "TypeError" and "<cell-" in bad["traceback"] and ":2:" in bad["traceback"]
        frames = await c.request("run_code", language="javascript", code="(await import('node:os')).platform()")
        assert main_result(frames) == "linux"  # a string result is its own text


async def test_typescript_cell_with_a_type_annotation(srv):
    async with session(srv) as c:
        if "typescript" not in languages(c):
            # the minimal image: a clear request error, never a dead worker
            done = done_of(await c.request("create_context", language="typescript"))
            assert done["error"]["name"] == "LanguageUnavailable" and done["error"]["kind"] == "request"
            pytest.skip("this image has no TypeScript (build the standard profile)")
        code = "interface P { n: number }\nconst p: P = { n: 20 };\nfunction add(a: number, b: number): number { return a + b }\nadd(p.n, 22)"
        frames = await c.request("run_code", language="typescript", code=code)
        assert done_of(frames)["ok"], frames
        assert main_result(frames) == "42"
        frames = await c.request(
            "run_code",
            language="typescript",
            code='import { sep } from "node:path";\nconst s: string = await Promise.resolve(sep);\ns + p.n',
        )
        assert done_of(frames)["ok"], frames
        assert main_result(frames) == "/20"
        bad = done_of(await c.request("run_code", language="typescript", code="const x: = 1"))
        assert bad["error"]["name"] == "SyntaxError" and bad["error"]["kind"] == "user"


async def test_env_per_run(srv):
    async with session(srv) as c:
        env = {"RUN_VAR": "run-value"}
        py = await c.request("run_code", code="import os; os.environ.get('RUN_VAR')", env=env)
        assert main_result(py) == "'run-value'"
        assert main_result(await c.request("run_code", code="str(os.environ.get('RUN_VAR'))")) == "'None'"
        js = await c.request("run_code", language="javascript", code="process.env.RUN_VAR", env=env)
        assert main_result(js) == "run-value"
        js = await c.request("run_code", language="javascript", code="String(process.env.RUN_VAR)")
        assert main_result(js) == "undefined"
        sh = await c.request("run_code", language="bash", code='echo "[$RUN_VAR]"', env=env)
        assert WSClient.text(sh) == "[run-value]\n"
        sh = await c.request("run_code", language="bash", code='echo "[${RUN_VAR-unset}]"')
        assert WSClient.text(sh) == "[unset]\n"


async def test_session_env_reaches_everything_and_is_never_logged(srv, caplog):
    caplog.set_level(logging.DEBUG)
    async with session(srv) as c:
        await call_ok(c, "run_code", code="import os")  # a context started before the session env is set
        done = await call_ok(c, "set_env", env={"TOKEN_X": SECRET, "SHARED": "session"})
        assert done["names"] == ["SHARED", "TOKEN_X"] and SECRET not in str(done)
        assert main_result(await c.request("run_code", code="os.environ['TOKEN_X']")) == repr(SECRET)
        assert WSClient.text(await c.request("exec", command="echo $TOKEN_X")) == SECRET + "\n"
        # the request's env wins over the session's
        assert WSClient.text(await c.request("exec", command="echo $SHARED", env={"SHARED": "mine"})) == "mine\n"
        ctx = (await call_ok(c, "create_context", language="javascript"))["context_id"]
        js = await c.request("run_code", context=ctx, code="process.env.TOKEN_X")
        assert main_result(js) == SECRET
        proc = await c.request("start_process", command="echo $TOKEN_X")
        pid = done_of(proc)["process_id"]
        while not any(f.get("type") == "exit" and f.get("process_id") == pid for f in c.frames):
            await c.recv()
        assert SECRET + "\n" in [f.get("text") for f in c.frames if f.get("process_id") == pid]
        # replace: the old names are gone
        assert (await call_ok(c, "set_env", env={"OTHER": "1"}, replace=True))["names"] == ["OTHER"]
        assert WSClient.text(await c.request("exec", command='echo "[${TOKEN_X-gone}]"')) == "[gone]\n"
        import httpx

        async with httpx.AsyncClient() as h:
            metrics = (await h.get(srv.http + "/metrics")).text
    assert SECRET not in metrics
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


async def test_a_fresh_run_is_clean_and_leaves_no_context(srv):
    async with session(srv) as c:
        await call_ok(c, "set_env", env={"FROM_SESSION": "yes"})
        await call_ok(c, "run_code", code="x = 41")  # state in the default context
        probe = "import os\n(globals().get('x'), os.environ.get('FROM_SESSION'), os.environ.get('MINE'))"
        frames = await c.request("run_code", code=probe, fresh=True, env={"MINE": "1"})
        done = done_of(frames)
        assert done["ok"] and done["context"].startswith("fresh-"), done
        assert main_result(frames) == "(None, 'yes', '1')"
        assert main_result(await c.request("run_code", code="x + 1")) == "42"  # the default context is untouched
        # other languages, a failing run, and a timeout: each run's context is gone after it
        js = await c.request("run_code", code="typeof x", language="javascript", fresh=True)
        assert main_result(js) == "undefined"  # typeof x: no x there
        bad = done_of(await c.request("run_code", code="1 / 0", fresh=True))
        assert bad["error"]["name"] == "ZeroDivisionError"
        slow = done_of(await c.request("run_code", code="import time\ntime.sleep(30)", fresh=True, timeout_s=1))
        assert slow["error"]["name"] == "Timeout"
        for _ in range(50):
            alive = [x["context_id"] for x in (await call_ok(c, "list_contexts"))["contexts"] if x["alive"]]
            if not [cid for cid in alive if cid.startswith("fresh-")]:
                break
            await asyncio.sleep(0.05)
        assert alive == ["default-python"], alive
        # a client's own context named like the next fresh ones is never taken for one
        last = int(done_of(await c.request("run_code", code="1", fresh=True))["context"].split("-")[1])
        taken = [f"fresh-{last + i}" for i in range(1, 4)]
        for cid in taken:
            await call_ok(c, "create_context", language="bash", context=cid)
        mine = done_of(await c.request("run_code", code="1 + 1", fresh=True))
        assert mine["ok"] and mine["context"] not in taken, mine
        await asyncio.sleep(0.1)  # its deletion (20 ms after its done)
        listed = {x["context_id"] for x in (await call_ok(c, "list_contexts"))["contexts"]}
        assert set(taken) <= listed and mine["context"] not in listed, listed
        for cid in taken:
            await call_ok(c, "delete_context", context=cid)
        refused = done_of(await c.request("run_code", code="1", fresh=True, context="default-python"))
        assert refused["ok"] is False and refused["error"]["name"] == "BadRequest", refused
        # many at once: each its own
        rids = [await c.send("run_code", code=f"y = {i}\ny", fresh=True) for i in range(6)]
        runs = [await c.until_done(rid) for rid in rids]
        assert [main_result(c.of(rid)) for rid in rids] == [str(i) for i in range(6)], runs


async def test_a_name_the_session_drops_is_gone_from_contexts_created_before(srv):
    """set_env replace: a context created while the session had a name loses it too (its runs, and what they
    start, in every language); the context's own env from create_context stays, and so do restarts."""
    async with session(srv) as c:
        await call_ok(c, "set_env", env={"DROPPED": "old", "KEPT": "old", "OWN": "session"})
        for language in ("python", "javascript", "bash"):
            await call_ok(c, "create_context", language=language, context=f"early-{language}", env={"OWN": "mine"})
        await call_ok(c, "set_env", env={"KEPT": "new"}, replace=True)
        shell = 'echo "${DROPPED-gone} $KEPT $OWN"'
        probes = {
            "python": f"import subprocess\nprint(subprocess.run(['sh', '-c', {shell!r}], capture_output=True, text=True).stdout, end='')",
            "javascript": f"console.log(require('child_process').execSync({shell!r}).toString().trim())",
            "bash": shell,
        }
        for language, probe in probes.items():
            for attempt in ("first", "again"):  # the run puts the context's environment back after it
                out = WSClient.text(await c.request("run_code", context=f"early-{language}", code=probe))
                assert out == "gone new mine\n", (language, attempt, out)
        await call_ok(c, "restart_context", context="early-python")
        out = WSClient.text(await c.request("run_code", context="early-python", code=probes["python"]))
        assert out == "gone new mine\n", out
        # set again, it is there again
        await call_ok(c, "set_env", env={"DROPPED": "back"})
        out = WSClient.text(await c.request("run_code", context="early-bash", code=shell))
        assert out == "back new mine\n", out


async def test_restart_context_clears_state(srv):
    async with session(srv) as c:
        await call_ok(c, "run_code", code="x = 1")
        done = await call_ok(c, "restart_context", context="default-python")
        assert done["context_id"] == "default-python"
        gone = done_of(await c.request("run_code", code="x"))
        assert gone["error"]["name"] == "NameError" and gone["error"]["kind"] == "user"
        listed = {x["context_id"]: x for x in (await call_ok(c, "list_contexts"))["contexts"]}
        assert listed["default-python"]["restarts"] == 1
        await call_ok(c, "run_code", language="bash", code="Y=1")
        await call_ok(c, "restart_context", context="default-bash")
        assert WSClient.text(await c.request("run_code", language="bash", code='echo "[$Y]"')) == "[]\n"
        # a default context never used starts on restart; an unknown one is a request error
        assert (await call_ok(c, "restart_context", context="default-javascript"))["context_id"] == "default-javascript"
        missing = done_of(await c.request("restart_context", context="nope"))
        assert missing["error"] == {**missing["error"], "name": "ContextNotFound", "kind": "request"}


async def test_restart_ends_a_running_cell(srv):
    async with session(srv) as c:
        rid = await c.send("run_code", code="import time\nprint('started', flush=True)\ntime.sleep(60)")
        while not any(f.get("type") == "stdout" for f in c.of(rid)):
            await c.recv()
        await call_ok(c, "restart_context", context="default-python")
        done = done_of(await c.until_done(rid))
        assert done["error"]["name"] == "ContextRestarted" and done["error"]["kind"] == "request"


async def test_execution_count(srv):
    async with session(srv) as c:
        counts = [done_of(await c.request("run_code", code=str(i)))["execution_count"] for i in range(3)]
        assert counts == [1, 2, 3]
        ctx = (await call_ok(c, "create_context"))["context_id"]
        assert done_of(await c.request("run_code", code="1", context=ctx))["execution_count"] == 1


async def test_close_session_leaves_no_container(srv):
    c = await WSClient.connect(srv.url, token="tok1")
    sid = c.ready["session_id"]
    await call_ok(c, "run_code", code="1")
    slow = await c.send("run_code", code="import time; time.sleep(60)")
    rid = await c.send("close_session")
    frames = await c.until_done(rid)
    assert done_of(frames)["ok"] is True
    # the request it cancelled ended first, with its own done
    cancelled = [f for f in c.of(slow) if f["type"] == "done"]
    assert cancelled and cancelled[0]["error"]["name"] == "Cancelled"
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await c.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    for _ in range(100):
        if sid not in srv.state.manager.sessions:
            break
        await asyncio.sleep(0.1)
    assert sid not in srv.state.manager.sessions
    client = docker.from_env()
    try:
        for _ in range(100):
            left = client.api.containers(filters={"label": [f"groundloop.session={sid}"]})
            if not left:
                break
            await asyncio.sleep(0.1)
        assert not left, left
    finally:
        client.close()
    # the session cannot be resumed
    with pytest.raises(ConnectionError, match="not_found"):
        await WSClient.connect(srv.url, token="tok1", session=sid, last_seq=1)


async def test_unknown_fields_are_refused(srv):
    async with session(srv) as c:
        frames = await c.request("run_code", code="1", envv={"A": "1"})
        err = [f for f in frames if f["type"] == "error"]
        assert err and err[0]["code"] == "bad_request" and "`envv`" in err[0]["message"]
        done = done_of(frames)
        assert done["error"]["name"] == "BadRequest" and done["error"]["kind"] == "request"
        # null is absent, for every field
        assert done_of(await c.request("run_code", code="1", context=None, whatever=None))["ok"]


async def test_errors_say_whose_they_are(srv):
    async with session(srv) as c:
        user = done_of(await c.request("run_code", code="1/0"))["error"]
        assert user["name"] == "ZeroDivisionError" and user["kind"] == "user"
        js = done_of(await c.request("run_code", language="javascript", code="null.x"))["error"]
        assert js["name"] == "TypeError" and js["kind"] == "user"
        mismatch = done_of(await c.request("run_code", language="javascript", context="default-python", code="1"))
        assert mismatch["error"]["name"] == "LanguageMismatch" and mismatch["error"]["kind"] == "request"
        missing = done_of(await c.request("run_code", context="nope", code="1"))["error"]
        assert missing["name"] == "ContextNotFound" and missing["kind"] == "request"
        await call_ok(c, "exec", command="mkdir -p locked && chmod 000 locked")
        locked = done_of(await c.request("create_context", cwd="locked"))["error"]
        assert locked["name"] == "PermissionError" and locked["kind"] == "request"
        exists = done_of(await c.request("create_context", context="default-python"))["error"]
        assert exists["name"] == "ContextExists" and exists["kind"] == "request"
        nul = done_of(await c.request("run_code", language="bash", code="echo a\0b"))["error"]
        assert nul["name"] == "BadRequest" and nul["kind"] == "request"
        proc = done_of(await c.request("kill_process", process_id="nope"))["error"]
        assert proc["name"] == "ProcessNotFound" and proc["kind"] == "request"
