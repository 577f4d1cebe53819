"""The WebSocket endpoint end to end: real uvicorn, real websockets clients, real Docker."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import orjson
import pytest
from support.env import server_settings
from support.servers import run_server
from support.wsclient import WSClient
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = pytest.mark.docker


def done_of(frames):
    assert frames[-1]["type"] == "done"
    assert sum(1 for f in frames if f["type"] == "done") == 1
    return frames[-1]


async def test_ready_frame(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        r = c.ready
        assert r["seq"] == 1 and r["resumed"] is False and r["protocol"] == "groundloop.v1"
        assert r["sandbox"]["backend"] == "docker" and r["sandbox"]["image"]
        # sandbox/channel.py's socket by default (auto); the attach stream with GROUNDLOOP_SANDBOX_CHANNEL=attach
        assert r["sandbox"]["channel"] == server.settings.sandbox.channel.replace("auto", "socket")
        assert r["limits"]["max_message_bytes"] == server.settings.max_message_bytes
        assert r["session_id"] in server.state.manager.sessions


async def test_code_and_contexts(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        frames = await c.request(
            "run_code", code="import sys\nfor i in range(3): print(i)\nprint('oops', file=sys.stderr)\nx = 41\nx + 1"
        )
        done = done_of(frames)
        assert done["ok"] is True and done["duration_ms"] >= 0
        assert [f["text"] for f in frames if f["type"] == "stdout"] == ["0\n", "1\n", "2\n"]
        assert WSClient.text(frames, "stderr") == "oops\n"
        result = [f for f in frames if f["type"] == "result"]
        assert result[-1]["data"]["text/plain"] == "42" and result[-1]["main"] is True
        # the default context keeps state; an error ends ok:false with a traceback
        assert done_of(await c.request("run_code", code="x"))["ok"]
        bad = done_of(await c.request("run_code", code="1/0"))
        assert bad["ok"] is False and bad["error"]["name"] == "ZeroDivisionError" and bad["error"]["traceback"]
        js = await c.request("run_code", code="console.log('hi from js'); 6*7", language="javascript")
        assert done_of(js)["ok"] and WSClient.text(js) == "hi from js\n"
        # explicit contexts
        created = done_of(await c.request("create_context", language="python"))
        cid = created["context_id"]
        assert done_of(await c.request("run_code", code="y = 5", context=cid))["ok"]
        missing = done_of(await c.request("run_code", code="x", context=cid))
        assert missing["error"]["name"] == "NameError"
        listed = done_of(await c.request("list_contexts"))
        assert cid in [ctx["context_id"] for ctx in listed["contexts"]]
        assert done_of(await c.request("delete_context", context=cid))["ok"]
        gone = done_of(await c.request("run_code", code="y", context=cid))
        assert gone["ok"] is False and gone["error"]["name"] == "ContextNotFound"
        # timeout
        slow = done_of(await c.request("run_code", code="import time; time.sleep(30)", timeout_s=1))
        assert slow["ok"] is False and slow["error"]["name"] == "Timeout"


async def test_exec_files_processes_ping(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        frames = await c.request("exec", command="echo out; echo err >&2; exit 3", env={"A": "1"})
        done = done_of(frames)
        assert done["exit_code"] == 3
        assert WSClient.text(frames) == "out\n" and WSClient.text(frames, "stderr") == "err\n"
        assert done_of(await c.request("mkdir", path="d/e"))["ok"]
        assert done_of(await c.request("write_file", path="d/e/a.txt", content="héllo\n"))["ok"]
        raw = base64.b64encode(b"\x00\xff").decode()
        assert done_of(await c.request("write_file", path="d/b.bin", content=raw, encoding="base64"))["ok"]
        read = done_of(await c.request("read_file", path="d/e/a.txt"))
        assert read["content"] == "héllo\n" and read["encoding"] == "utf-8"
        read = done_of(await c.request("read_file", path="d/b.bin", encoding="base64"))
        assert base64.b64decode(read["content"]) == b"\x00\xff"
        entries = done_of(await c.request("list_files", path="d"))["entries"]
        assert {(e["name"], e["type"]) for e in entries} == {("e", "directory"), ("b.bin", "file")}
        assert done_of(await c.request("delete_file", path="d/b.bin"))["ok"]
        missing = done_of(await c.request("read_file", path="d/b.bin"))
        assert missing["ok"] is False and missing["error"]["name"] == "FileNotFoundError"
        # background processes: output tagged with process_id under the start request's id, then exit
        rid = await c.send("start_process", command="echo one; echo two >&2; exit 4")
        frames = await c.until_done(rid)
        pid = done_of(frames)["process_id"]
        while not c.of(rid, "exit"):
            await c.recv()
        outs = [f for f in c.of(rid) if f["type"] in ("stdout", "stderr")]
        assert {(f["type"], f["text"], f["process_id"]) for f in outs} == {
            ("stdout", "one\n", pid),
            ("stderr", "two\n", pid),
        }
        assert c.of(rid, "exit")[0]["exit_code"] == 4
        rid = await c.send("start_process", command="sleep 300")
        pid = done_of(await c.until_done(rid))["process_id"]
        procs = done_of(await c.request("list_processes"))["processes"]
        assert any(p["process_id"] == pid and p["running"] for p in procs)
        assert done_of(await c.request("kill_process", process_id=pid))["ok"]
        while not c.of(rid, "exit"):
            await c.recv()
        frames = await c.request("ping")
        assert [f["type"] for f in frames] == ["pong", "done"] and frames[-1]["ok"]


async def test_cancel_and_concurrent_requests(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        long = await c.send("run_code", code="import time\nprint('start', flush=True)\ntime.sleep(60)")
        quick = await c.send("exec", command="echo quick")
        assert done_of(await c.until_done(quick))["exit_code"] == 0
        while not c.of(long, "stdout"):
            await c.recv()
        cancel = done_of(await c.request("cancel", target=long))
        assert cancel["ok"] and cancel["found"] is True
        done = done_of(await c.until_done(long))
        assert done["ok"] is False and done["error"]["name"] == "Cancelled"
        assert done_of(await c.request("cancel", target="nothing"))["found"] is False
        # the context survived the cancel
        assert done_of(await c.request("run_code", code="1"))["ok"]


async def test_bad_frames_keep_the_connection(server):
    async with await WSClient.connect(server.url, token="tok1") as c:
        await c.send_raw("{not json")
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == "bad_request" and "id" not in err
        await c.send_raw(orjson.dumps({"type": "teleport", "id": "t1"}).decode())
        frames = await c.until_done("t1")
        assert frames[0]["type"] == "error" and frames[0]["code"] == "bad_request"
        assert frames[-1]["ok"] is False and frames[-1]["error"]["name"] == "BadRequest"
        await c.send_raw(orjson.dumps({"type": "run_code", "id": "t2"}).decode())
        assert (await c.until_done("t2"))[0]["code"] == "bad_request"
        # a duplicate id among in-flight requests: error, and the first one goes on
        await c.send("run_code", id="dup", code="import time; time.sleep(1); print('first')")
        await c.send("run_code", id="dup", code="print('second')")
        frames = await c.until_done("dup")
        assert [f["type"] for f in frames] == ["error", "stdout", "done"] and frames[1]["text"] == "first\n"
        assert done_of(await c.request("ping"))["ok"]


async def test_oversized_frames():
    settings = server_settings(max_message_bytes=64 << 10)
    async with run_server(settings) as srv, await WSClient.connect(srv.url, token="tok1") as c:
        await c.send("run_code", id="big", code="#" + "x" * (100 << 10))
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == "too_large"
        assert done_of(await c.request("ping"))["ok"]  # still usable
        # past the transport's limit the connection is closed with 1009
        await c.send_raw("x" * (200 << 10))
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd.code == 1009


async def test_auth(server):
    for kw in ({}, {"token": "wrong"}, {"token": "wrong", "subprotocol_token": True}):
        with pytest.raises(InvalidStatus) as info:
            await WSClient.connect(server.url, **kw)
        assert info.value.response.status_code == 401
        assert b"session" not in info.value.response.body
    async with await WSClient.connect(server.url, token="tok2", subprotocol_token=True) as c:
        assert c.ws.subprotocol == "groundloop.v1"
        assert server.state.manager.sessions[c.session_id].user == "bob"


async def test_origin(server):
    with pytest.raises(InvalidStatus) as info:
        await WSClient.connect(server.url, token="tok1", origin="http://evil.example")
    assert info.value.response.status_code == 403
    own = f"http://127.0.0.1:{server.port}"
    async with await WSClient.connect(server.url, token="tok1", origin=own) as c:
        assert c.ready["type"] == "ready"


async def test_allowed_origins_and_anonymous_loopback():
    settings = server_settings(tokens=[], allowed_origins=["https://ide.example"])
    async with run_server(settings) as srv:
        async with await WSClient.connect(srv.url, origin="https://ide.example") as c:
            assert srv.state.manager.sessions[c.session_id].user == "local"
        with pytest.raises(InvalidStatus):
            await WSClient.connect(srv.url, origin=f"http://127.0.0.1:{srv.port}")


def test_non_loopback_bind_without_tokens_is_refused():
    from groundloop.sandbox.settings import SettingsError
    from groundloop.server.app import create_app

    with pytest.raises(SettingsError):
        create_app(server_settings(host="0.0.0.0", tokens=[]))
    create_app(server_settings(host="0.0.0.0"))  # with tokens it is fine


async def test_foreign_and_unknown_sessions_look_the_same(server):
    async with await WSClient.connect(server.url, token="tok1") as alice:
        answers = []
        for token, sid in (("tok2", alice.session_id), ("tok2", "no-such-session")):
            c = await WSClient.connect(server.url, token=token, session=sid, last_seq=1, expect_ready=False)
            frame = orjson.loads(await c.ws.recv())
            with pytest.raises(ConnectionClosed) as info:
                await c.ws.recv()
            answers.append((frame, info.value.rcvd.code))
        assert answers[0] == answers[1]
        assert answers[0][0]["code"] == "not_found" and answers[0][1] == 4404
        # alice's session is untouched
        assert done_of(await alice.request("ping"))["ok"]


async def test_limits():
    settings = server_settings(max_inflight=1, max_sessions_per_user=1, rate_per_s=0.001, rate_burst=3)
    async with run_server(settings) as srv, await WSClient.connect(srv.url, token="tok1") as c:
        long = await c.send("run_code", code="import time; time.sleep(60)")
        frames = await c.request("ping")
        assert frames[0]["type"] == "error" and frames[0]["code"] == "busy"
        assert frames[-1]["ok"] is False and frames[-1]["error"]["name"] == "Busy"
        assert done_of(await c.request("cancel", target=long))["found"]  # cancel is never limited
        assert done_of(await c.until_done(long))["error"]["name"] == "Cancelled"
        assert done_of(await c.request("ping"))["ok"]
        assert done_of(await c.request("ping"))["ok"]
        frames = await c.request("ping")  # over the burst of three (a busy refusal takes no token)
        assert frames[0]["code"] == "rate_limited" and frames[-1]["error"]["name"] == "RateLimited"
        # a second session of the same user
        other = await WSClient.connect(srv.url, token="tok1", expect_ready=False)
        frame = orjson.loads(await other.ws.recv())
        assert frame["type"] == "error" and frame["code"] == "busy"
        with pytest.raises(ConnectionClosed) as info:
            await other.ws.recv()
        assert info.value.rcvd.code == 4429
        # bob is not limited by alice
        async with await WSClient.connect(srv.url, token="tok2") as bob:
            assert done_of(await bob.request("ping"))["ok"]


class ScriptedRunner:
    """An assist runner that follows a fixed script (the seam create_app(assist=) offers)."""

    available = True

    def __init__(self, codes):
        self.codes = codes

    async def run(self, *, rid, prompt, language, max_iterations, context, emit, execute, scope=""):
        last = None
        for i, code in enumerate(self.codes[:max_iterations], start=1):
            await emit({"type": "token", "text": f"try {i}", "iteration": i})
            await emit({"type": "code", "code": code, "language": language, "iteration": i})
            last = await execute(code, language, i)
            await emit(
                {
                    "type": "attempt",
                    "iteration": i,
                    "ok": last["ok"],
                    **({"error": last["error"]} if "error" in last else {}),
                }
            )
            if last["ok"]:
                return {"ok": True, "iterations": i, "code": code, "output": last["output"]}
        return {
            "ok": False,
            "iterations": len(self.codes),
            "code": self.codes[-1],
            "output": last["output"],
            "error": last.get("error"),
        }


async def test_assist_wiring():
    runner = ScriptedRunner(["print('a'); 1/0", "print('b')", "import time; time.sleep(60)"])
    async with run_server(server_settings(), assist=runner) as srv, await WSClient.connect(srv.url, token="tok1") as c:
        frames = await c.request("assist", prompt="print b")
        done = done_of(frames)
        assert done["ok"] and done["iterations"] == 2 and done["output"] == "b\n"
        kinds = [(f["type"], f.get("iteration")) for f in frames]
        assert kinds == [
            ("token", 1),
            ("code", 1),
            ("stdout", 1),
            ("attempt", 1),
            ("token", 2),
            ("code", 2),
            ("stdout", 2),
            ("attempt", 2),
            ("done", None),
        ]
        # cancel an assist while its code runs: the sandbox request is cancelled too
        runner.codes = ["import time\nprint('go', flush=True)\ntime.sleep(60)"]
        rid = await c.send("assist", prompt="sleep")
        while not c.of(rid, "stdout"):
            await c.recv()
        await c.send("cancel", target=rid)
        assert done_of(await c.until_done(rid))["error"]["name"] == "Cancelled"
        assert done_of(await c.request("run_code", code="print('free')"))["ok"]


async def test_assist_without_a_model():
    class Off:
        available = False

    async with run_server(server_settings(), assist=Off()) as srv, await WSClient.connect(srv.url, token="tok1") as c:
        frames = await c.request("assist", prompt="x")
        assert frames[0]["type"] == "error" and frames[0]["code"] == "llm_unavailable"
        assert frames[-1]["error"]["name"] == "LLMUnavailable" and "ANTHROPIC_API_KEY" in frames[-1]["error"]["message"]


async def test_sandbox_lost_is_replaced(server):
    import docker

    async with await WSClient.connect(server.url, token="tok1") as c:
        assert done_of(await c.request("run_code", code="x = 1"))["ok"]
        rid = await c.send("run_code", code="import time\nprint('up', flush=True)\ntime.sleep(60)")
        while not c.of(rid, "stdout"):
            await c.recv()
        session = server.state.manager.sessions[c.session_id]

        def kill() -> None:
            with contextlib.closing(docker.from_env()) as client:  # an unclosed client's socket warns, as an error
                client.containers.get(session.sb.id).kill()

        await asyncio.to_thread(kill)
        done = done_of(await c.until_done(rid))
        assert done["ok"] is False and done["error"]["name"] == "SandboxLost"
        while not any(f["type"] == "sandbox_replaced" for f in c.frames):
            await c.recv()
        gone = done_of(await c.request("run_code", code="x"))
        assert gone["error"]["name"] == "NameError"  # state was lost, the session goes on


async def test_requests_that_wait_for_the_sandbox_keep_their_order(server):
    """Requests that wait for a sandbox (as during a replacement) reach it in the order they were
    sent, before a request that arrives just as it becomes ready and needs no wait."""
    async with await WSClient.connect(server.url, token="tok1") as c:
        session = server.state.manager.sessions[c.session_id]
        session._sb_ready.clear()  # what a replacement does while it runs
        rids = [await c.send("run_code", code="xs = []")]
        rids += [await c.send("run_code", code=f"xs.append({i})") for i in range(3)]
        while len(session.inflight) < len(rids):
            await asyncio.sleep(0.01)
        session._sb_ready.set()
        # in the same turn of the loop, before the waiting requests have moved on
        await session.handle_frame(orjson.dumps({"type": "run_code", "id": "late", "code": "xs.append(3)"}))
        for rid in rids + ["late"]:
            assert done_of(await c.until_done(rid))["ok"], rid
        frames = await c.request("run_code", code="xs")
        assert [f["data"]["text/plain"] for f in frames if f["type"] == "result"] == ["[0, 1, 2, 3]"]


async def test_logs_and_audit_never_show_the_token(server, caplog):
    import hashlib
    import logging

    caplog.set_level(logging.INFO, logger="groundloop")
    code = "print('audited')"
    async with await WSClient.connect(server.url, token="tok1") as c:
        assert (await c.call("run_code", code=code))["ok"]
        await c.send_raw("{broken")
        await c.recv()
    lines = [
        orjson.loads(r.getMessage())
        for r in caplog.records
        if r.name.startswith("groundloop") and r.getMessage().startswith("{")
    ]
    events = {line["event"] for line in lines}
    assert {"connect", "request", "error", "audit"} <= events
    audit = [line for line in lines if line["event"] == "audit"][0]
    assert audit["user"] == "alice" and audit["type"] == "run_code" and audit["outcome"] == "ok"
    assert audit["sha256"] == hashlib.sha256(code.encode()).hexdigest() and audit["duration_ms"] >= 0
    assert not any("tok1" in r.getMessage() for r in caplog.records)
