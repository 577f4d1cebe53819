"""The Python client (groundloop.client) against the real server: real uvicorn, real Docker.

Resume is tested through a loopback TCP proxy that stalls and cuts the link,
so the server sees the socket die mid-stream as it would on a real network.
"""

from __future__ import annotations

import asyncio

import pytest
from groundloop.client import (
    AuthError,
    ConnectError,
    GapError,
    RequestError,
    Result,
    Session,
    SessionClosed,
    connect,
)
from support.env import server_settings
from support.programs import GATED
from support.servers import run_server
from support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.docker


async def until(predicate, timeout: float = 60.0) -> None:
    """Wait for server-side state that has no event to await (bounded)."""

    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


# A 1x1 PNG, built with the stdlib inside the sandbox.
PNG_CODE = """\
import struct, zlib
def _chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
class Dot:
    def _repr_png_(self):
        return (b'\\x89PNG\\r\\n\\x1a\\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', 1, 1, 8, 2, 0, 0, 0))
                + _chunk(b'IDAT', zlib.compress(b'\\x00\\xff\\x00\\x00')) + _chunk(b'IEND', b''))
Dot()
"""


async def test_run_code_streams_and_returns_a_typed_execution(server):
    lines: list[str] = []
    errs: list[str] = []
    results: list[Result] = []

    async def on_result(r: Result) -> None:  # callbacks may be coroutines
        results.append(r)

    async with connect(server.url, "tok1") as s:
        assert s.ready is not None and s.ready["resumed"] is False and s.session_id
        run = await s.run_code(
            "import sys\nfor i in range(3): print(i)\nprint('oops', file=sys.stderr)\nx = 41\nx + 1",
            on_stdout=lines.append,
            on_stderr=errs.append,
            on_result=on_result,
        )
        assert run.ok and run.error is None and run.context == "default-python"
        assert lines == ["0\n", "1\n", "2\n"] and errs == ["oops\n"]
        assert run.stdout == "0\n1\n2\n" and run.stderr == "oops\n" and run.output == "0\n1\n2\noops\n"
        assert run.text == "42" and results == run.results and results[-1].main
        assert run.duration_ms >= 0 and run.raise_for_error() is run
        # state persists in the default context; a failure is in .error, not raised
        bad = await s.run_code("x / 0")
        assert not bad.ok and bad.error is not None and bad.error.name == "ZeroDivisionError"
        assert bad.error.traceback and "ZeroDivisionError" in bad.error.traceback
        with pytest.raises(RequestError) as info:
            bad.raise_for_error()
        assert info.value.name == "ZeroDivisionError"
        # rich results: image/png is base64 in the bundle, decoded by Result.png()
        img = await s.run_code(PNG_CODE)
        png = img.results[-1].png()
        assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
        js = await s.run_code("console.log('hi from js'); 6 * 7", language="javascript")
        assert js.ok and js.stdout == "hi from js\n" and js.text == "42"
        slow = await s.run_code("import time; time.sleep(30)", timeout_s=1)
        assert slow.error is not None and slow.error.name == "Timeout"


async def test_displays_fold_as_a_notebook_shows_them(server):
    """An update replaces its display's result in place; clear_output drops the output and results before it
    (with wait: once the next output comes). The callbacks get every result."""
    seen: list[Result] = []
    async with connect(server.url, "tok1") as s:
        run = await s.run_code(
            "from IPython.display import display, update_display, clear_output\n"
            "print('gone')\ndisplay('old')\nclear_output()\n"
            "print('kept')\ndisplay('one', display_id='d1')\ndisplay('other')\nupdate_display('two', display_id='d1')\n"
            "clear_output(wait=True)",  # nothing comes after it: nothing is cleared
            on_result=seen.append,
        )
        assert run.ok, run.error
        assert run.stdout == "kept\n" and run.output == "kept\n"
        assert [(r.text, r.display_id, r.update) for r in run.results] == [
            ("'two'", "d1", False),
            ("'other'", None, False),
        ]
        assert [r.text for r in seen] == ["'old'", "'one'", "'other'", "'two'"]
        later = await s.run_code("update_display('three', display_id='d1')")
        assert [(r.text, r.display_id, r.update) for r in later.results] == [("'three'", "d1", True)]


async def test_a_fresh_run_sees_nothing_of_the_default_context(server):
    async with connect(server.url, "tok1") as s:
        assert (await s.run_code("z = 1")).ok
        fresh = await s.run_code("'z' in globals()", fresh=True)
        assert fresh.ok and fresh.text == "False" and fresh.context is not None and fresh.context.startswith("fresh-")
        assert (await s.run_code("z")).text == "1"


async def test_frames_by_async_iteration(server):
    async with connect(server.url, "tok1") as s:
        req = await s.request("run_code", code="print('a')\nprint('b')\n7")
        kinds = [(f["type"], f.get("text")) async for f in req]
        assert kinds[:2] == [("stdout", "a\n"), ("stdout", "b\n")]
        assert kinds[-1][0] == "done" and ("result", None) in kinds
        done = await req.wait()
        assert done["ok"] and done["id"] == req.id


async def test_contexts_exec_files_ping(server):
    async with connect(server.url, "tok1") as s:
        cid = await s.create_context("python", context_id="mine")
        assert cid == "mine"
        assert (await s.run_code("y = 5", context=cid)).ok
        assert (await s.run_code("y", context=cid)).text == "5"
        assert cid in [c.context_id for c in await s.list_contexts()]
        await s.delete_context(cid)
        gone = await s.run_code("y", context=cid)
        assert gone.error is not None and gone.error.name == "ContextNotFound"
        with pytest.raises(RequestError) as info:
            await s.delete_context("no-such-context")
        assert info.value.name

        out: list[str] = []
        cmd = await s.exec("echo out; echo err >&2; echo $A; exit 3", env={"A": "v"}, on_stdout=out.append)
        assert cmd.exit_code == 3 and cmd.stdout == "out\nv\n" and cmd.stderr == "err\n" and out == ["out\n", "v\n"]

        await s.mkdir("d/e")
        assert await s.write_file("d/e/a.txt", "héllo\n") == len("héllo\n".encode())
        assert await s.write_file("d/b.bin", b"\x00\xff") == 2
        assert await s.read_text("d/e/a.txt") == "héllo\n"
        assert await s.read_bytes("d/b.bin") == b"\x00\xff"
        entries = {(e.name, e.type) for e in await s.list_files("d")}
        assert entries == {("e", "directory"), ("b.bin", "file")}
        await s.delete_file("d/b.bin")
        await s.delete_file("d", recursive=True)
        assert [e.name for e in await s.list_files(".") if e.name == "d"] == []
        with pytest.raises(RequestError):
            await s.read_text("d/e/a.txt")
        assert await s.ping() > 0


async def test_background_processes(server):
    async with connect(server.url, "tok1") as s:
        proc = await s.start_process("for i in 1 2 3; do echo line $i; done; echo warn >&2; exit 4")
        assert proc.pid
        frames = [f async for f in proc]
        assert [f["text"] for f in frames if f["type"] == "stdout"] == ["line 1\n", "line 2\n", "line 3\n"]
        assert [f["text"] for f in frames if f["type"] == "stderr"] == ["warn\n"]
        assert await proc.wait() == 4
        sleeper = await s.start_process("echo up; sleep 300", process_id="sleeper")
        first = await sleeper.__anext__()
        assert first["type"] == "stdout" and first["text"] == "up\n"
        listed = {p.process_id: p for p in await s.list_processes()}
        assert listed["sleeper"].running and listed["sleeper"].command == "echo up; sleep 300"
        await sleeper.kill()
        await sleeper.wait()
        assert sleeper.exited and not (await s.list_processes())[-1].running
        with pytest.raises(RequestError):
            await s.kill_process("no-such-process")
    # unread output of a chatty process is bounded: the oldest frames go, and are counted
    async with connect(server.url, "tok1", process_buffer_frames=5) as s:
        chatty = await s.start_process("seq 1 20")
        assert await chatty.wait() == 0
        assert [f["text"] for f in chatty.read()] == [f"{i}\n" for i in range(16, 21)] and chatty.dropped == 15


async def test_cancel_explicit_and_by_cancelling_the_task(server):
    async with connect(server.url, "tok1") as s:
        # explicit: Request.cancel()
        req = await s.request("run_code", code="import time\nprint('started', flush=True)\ntime.sleep(300)")
        assert (await req.__anext__())["type"] == "stdout"
        assert await req.cancel() is True
        done = await req.wait()
        assert done["ok"] is False and done["error"]["name"] == "Cancelled"
        assert await s.cancel("not-in-flight") is False

        # cancelling the task that awaits run_code sends `cancel`: the server ends the run
        started = asyncio.Event()
        task = asyncio.create_task(
            s.run_code(
                "import time\nprint('started', flush=True)\ntime.sleep(300)",
                timeout_s=300,
                on_stdout=lambda _: started.set(),
            )
        )
        await started.wait()
        session = server.state.manager.sessions[s.session_id]
        assert len(session.inflight) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # only a cancel ends a 300 s sleep within the wait
        await until(lambda: not session.inflight)
        after = await s.run_code("print('after')")
        assert after.ok and after.stdout == "after\n"

        # a callback that raises: the error reaches the caller and the run is stopped on the server
        def boom(line: str) -> None:
            raise ValueError(line)

        with pytest.raises(ValueError, match="started"):
            await s.run_code(
                "import time\nprint('started', flush=True)\ntime.sleep(300)", timeout_s=300, on_stdout=boom
            )
        await until(lambda: not session.inflight)


async def test_auth_and_connect_errors(server):
    with pytest.raises(AuthError) as info:
        async with connect(server.url, "wrong"):
            pass
    assert info.value.status == 401
    with pytest.raises(ConnectError):
        async with connect("ws://127.0.0.1:9/v1/ws", "tok1", open_timeout=5):
            pass
    # an http:// base URL is accepted too
    async with connect(server.http, "tok1") as s:
        assert (await s.run_code("1 + 1")).text == "2"


async def test_resume_mid_stream_every_line_once(server):
    """The link dies mid-stream: the caller gets all 300 lines once, in order, and only a delay."""
    async with TcpProxy(server.port) as proxy:
        events: list[dict] = []
        async with connect(f"ws://127.0.0.1:{proxy.port}/v1/ws", "tok1", on_event=events.append) as s:
            lines: list[str] = []
            fifty = asyncio.Event()

            def on_line(line: str) -> None:
                lines.append(line)
                if len(lines) == 50:
                    fifty.set()

            run = asyncio.create_task(s.run_code(GATED, on_stdout=on_line))
            await fifty.wait()
            proxy.cut()
            # sent while the link is down: waits for the resume, then goes through once
            assert await s.write_file("go", "") == 0
            execution = await asyncio.wait_for(run, 60)
            assert execution.ok
            assert lines == [f"{i}\n" for i in range(300)]
            assert execution.stdout == "".join(lines)
            assert s.resumes == 1 and proxy.connections == 2
            assert [e["type"] for e in events] == ["ready"] and events[0]["resumed"] is True


async def test_resume_resends_a_request_the_server_never_read(server):
    async with TcpProxy(server.port) as proxy:
        async with connect(f"ws://127.0.0.1:{proxy.port}/v1/ws", "tok1") as s:
            proxy.swallow_up = True  # the request is written to a socket but never reaches the server
            run = asyncio.create_task(s.run_code("open('count', 'a').write('x')\nprint('ran')"))
            await until(lambda: proxy.swallowed > 0)  # the request's bytes vanished into the proxy
            proxy.cut()
            execution = await asyncio.wait_for(run, 60)
            assert execution.ok and execution.stdout == "ran\n"
            assert await s.read_text("count") == "x"
            assert s.resumes == 1


async def test_resume_does_not_repeat_a_request_whose_answer_was_lost(server):
    """The server runs two requests but none of their frames reach us before the link dies.

    On resume, the first one's replay (about 1 MB, many reads) comes before any frame of the
    second: the second must not be resent before the replay is all in, or it would run twice.
    """
    async with TcpProxy(server.port) as proxy:
        async with connect(f"ws://127.0.0.1:{proxy.port}/v1/ws", "tok1") as s:
            proxy.hold_down = True
            first = asyncio.create_task(
                s.run_code("for i in range(1000): print('y' * 999)\nopen('first_done', 'w').close()")
            )
            second = asyncio.create_task(s.exec("while [ ! -e first_done ]; do sleep 0.01; done; printf x >> count"))
            session = server.state.manager.sessions[s.session_id]
            await until(lambda: len(session.inflight) == 2)
            await until(lambda: not session.inflight)
            proxy.cut()
            big = await asyncio.wait_for(first, 60)
            assert big.ok and big.stdout == ("y" * 999 + "\n") * 1000
            assert (await asyncio.wait_for(second, 60)).exit_code == 0
            assert await s.read_text("count") == "x"  # ran once, not twice


async def test_gap_fails_the_pending_request_and_the_session_goes_on():
    async with run_server(server_settings(replay_frames=16)) as srv, TcpProxy(srv.port) as proxy:
        events: list[dict] = []
        async with connect(f"ws://127.0.0.1:{proxy.port}/v1/ws", "tok1", on_event=events.append) as s:
            proxy.hold_down = True
            run = asyncio.create_task(s.run_code("for i in range(200): print(i, flush=True)"))
            session = srv.state.manager.sessions[s.session_id]
            await until(lambda: session.inflight)
            await until(lambda: not session.inflight)
            proxy.cut()
            with pytest.raises(GapError) as info:
                await run
            assert info.value.missed > 0
            assert [e["type"] for e in events][:2] == ["ready", "gap"]
            assert (await s.run_code("print('still here')")).stdout == "still here\n"


async def test_takeover_and_unresumable_sessions_end_with_session_closed(server):
    from support.wsclient import WSClient

    async with connect(server.url, "tok1") as s:
        req = await s.request("run_code", code="import time; time.sleep(300)", timeout_s=300)
        # another connection resumes this session: this one is closed 4409 and does not fight back
        other = await WSClient.connect(server.url, token="tok1", session=s.session_id, last_seq=s.last_seq)
        with pytest.raises(SessionClosed) as info:
            await req.wait()
        assert info.value.close_code == 4409 and s.closed is info.value
        with pytest.raises(SessionClosed):
            await s.run_code("1")
        await other.call("cancel", target=req.id)
        await other.ws.close()

    async with run_server(server_settings(resume_grace_s=1.0)) as srv:
        proxy = TcpProxy(srv.port)
        async with proxy:
            s = await Session(f"ws://127.0.0.1:{proxy.port}/v1/ws", "tok1").open()
            try:
                proxy.close_listener()  # the link dies and stays dead past the resume grace
                proxy.cut()
                with pytest.raises(SessionClosed) as info:
                    await s.run_code("1")
                assert "could not be resumed" in str(info.value)
            finally:
                await s.close()


async def test_assist_streams_tokens(fake):
    import anthropic
    from groundloop.server.metrics import Metrics
    from groundloop.sessions.assist import AssistRunner
    from support.fake_anthropic import text

    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
    settings = server_settings(model="claude-test")
    metrics = Metrics()
    fake.add(text("Computing.\n```python\nanswer = 6 * 7\nprint('answer', answer)\n```\n", "Done."))
    try:
        async with run_server(settings, metrics=metrics, assist=AssistRunner(settings, metrics, client=client)) as srv:
            async with connect(srv.url, "tok1") as s:
                tokens: list[str] = []
                kinds: list[str] = []
                out: list[str] = []
                result = await s.assist(
                    "what is 6*7?",
                    on_token=tokens.append,
                    on_stdout=out.append,
                    on_frame=lambda f: kinds.append(f["type"]),
                )
                assert result.ok and result.iterations == 1 and result.error is None
                assert result.code == "answer = 6 * 7\nprint('answer', answer)\n" and result.output == "answer 42\n"
                assert "".join(tokens) == result.text and result.text.endswith("Done.")
                assert out == ["answer 42\n"] and "code" in kinds and "attempt" in kinds
                assert (await s.run_code("answer")).text == "42"
    finally:
        await client.close()


def test_public_exports():
    import groundloop.client as c

    assert set(c.__all__) <= set(dir(c))
    assert c.AuthError.__mro__[1] is c.ConnectError and issubclass(c.GapError, c.GroundloopError)


async def test_the_example_in_docs_clients_md_runs(server):
    import os
    import re
    import sys
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "clients.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    env = {**os.environ, "GROUNDLOOP_URL": server.http, "GROUNDLOOP_TOKEN": "tok1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "> 0",
        "> 1",
        "> 2",
        "True True 42",
        "ZeroDivisionError",
        "3 hi",
        "hello",
        "['a.txt']",
        "stdout tick 1",
        "stdout tick 2",
        "0",
        "stdout",
        "result",
        "done",
        "True",
    ]
