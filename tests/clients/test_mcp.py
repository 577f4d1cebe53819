"""``groundloop mcp`` driven by the MCP SDK's own client over stdio, against the real server.

The MCP server runs as a subprocess (the installed ``groundloop`` script); it
connects to the test's server (real uvicorn, real Docker) or, without
``--url``, starts one of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
from pathlib import Path

import pytest
from groundloop.client.results import Error, Execution, Result
from groundloop.mcp import format as fmt
from mcp import Client, StdioServerParameters
from mcp.types import ImageContent, TextContent
from support.env import IMAGE, NAMESPACE

GROUNDLOOP = str(Path(sys.executable).parent / "groundloop")
TOOLS = {
    "run_code",
    "run_shell",
    "read_file",
    "write_file",
    "list_files",
    "start_process",
    "process_output",
    "stop_process",
    "list_processes",
}


@contextlib.asynccontextmanager
async def mcp_client(*args: str, env: dict[str, str] | None = None):
    params = StdioServerParameters(command=GROUNDLOOP, args=["mcp", *args], env=env)
    async with Client(params, read_timeout_seconds=120) as client:
        yield client


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


# ---- the formatting, on literal results (no I/O)


def test_truncate_keeps_head_and_tail_and_says_so():
    body = "".join(f"{i}\n" for i in range(10_000))
    cut = fmt.truncate(body, 1000)
    assert cut.startswith("0\n1\n2\n") and cut.endswith("9998\n9999\n")
    assert f"characters cut here: the output was {len(body)} characters" in cut
    assert fmt.truncate("short", 1000) == "short"


def test_execution_result_has_sections_images_and_error():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    run = Execution(
        id="r1",
        ok=False,
        stdout="out\n",
        stderr="err\n",
        output="out\nerr\n",
        results=[Result({"image/png": png, "text/plain": "<Figure>"}), Result({"text/plain": "42"}, main=True)],
        error=Error("ValueError", "bad", "Traceback (most recent call last):\nValueError: bad"),
        context="default-python",
        duration_ms=1.0,
        truncated=True,
    )
    result = fmt.execution(run, 1000)
    assert result.is_error
    text = text_of(result)
    assert text.index("[stdout]\nout") < text.index("[stderr]\nerr") < text.index("[result]\n42")
    assert fmt.SERVER_CUT_NOTE in text and "[error]\nValueError: bad\nTraceback" in text
    images = [c for c in result.content if isinstance(c, ImageContent)]
    assert [(i.mime_type, i.data) for i in images] == [("image/png", png)]


# ---- the real thing


@pytest.mark.docker
async def test_tools_over_stdio(server):
    async with mcp_client("--url", server.url, "--token", "tok1") as c:
        assert {t.name for t in (await c.list_tools()).tools} == TOOLS

        r = await c.call_tool(
            "run_code", {"code": "import sys\nprint('hi')\nprint('e', file=sys.stderr)\nx = 6\nx * 7"}
        )
        assert not r.is_error
        assert text_of(r) == "[stdout]\nhi\n[stderr]\ne\n[result]\n42"
        assert text_of(await c.call_tool("run_code", {"code": "x"})) == "[result]\n6"  # state persists
        js = await c.call_tool("run_code", {"code": "console.log(1 + 1)", "language": "javascript"})
        assert text_of(js).startswith("[stdout]\n2")

        png = await c.call_tool(
            "run_code",
            {
                "code": "import base64\nclass P:\n    def _repr_png_(self):\n"
                "        return base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC')\nP()"
            },
        )
        images = [c for c in png.content if isinstance(c, ImageContent)]
        assert len(images) == 1 and base64.b64decode(images[0].data).startswith(b"\x89PNG")

        sh = await c.call_tool("run_shell", {"command": "echo out; echo err >&2; exit 3"})
        assert sh.is_error and text_of(sh) == "[stdout]\nout\n[stderr]\nerr\n[exit code 3]"
        assert text_of(await c.call_tool("run_shell", {"command": "pwd"})) == "[stdout]\n/workspace\n[exit code 0]"

        w = await c.call_tool("write_file", {"path": "sub/dir/a.txt", "content": "héllo\n"})
        assert not w.is_error and text_of(w) == "wrote 7 bytes to sub/dir/a.txt"
        assert text_of(await c.call_tool("read_file", {"path": "sub/dir/a.txt"})) == "héllo\n"
        await c.call_tool("run_shell", {"command": "printf '\\377\\376' > sub/dir/b.bin"})
        binary = await c.call_tool("read_file", {"path": "sub/dir/b.bin"})
        assert not binary.is_error and text_of(binary) == "[sub/dir/b.bin is binary (2 bytes) and is not shown]"
        listing = text_of(await c.call_tool("list_files", {"path": "sub/dir"}))
        assert listing.startswith("sub/dir:\n") and "a.txt" in listing and "7" in listing

        started = text_of(await c.call_tool("start_process", {"command": "echo ready; exec sleep 300"}))
        assert started.startswith("started process ")
        pid = started.split()[2]
        assert pid in text_of(await c.call_tool("list_processes", {}))
        out = ""
        while "ready" not in out:
            out += text_of(await c.call_tool("process_output", {"process_id": pid}))
        assert "[still running]" in out
        stopped = text_of(await c.call_tool("stop_process", {"process_id": pid}))
        assert "[exited with code" in stopped


@pytest.mark.docker
async def test_errors_come_back_as_error_results(server):
    async with mcp_client("--url", server.url, "--token", "tok1") as c:
        r = await c.call_tool("run_code", {"code": "def f():\n    return 1 / 0\nf()"})
        assert r.is_error
        text = text_of(r)
        assert text.startswith("[error]\nZeroDivisionError: division by zero\nTraceback") and "f()" in text
        missing = await c.call_tool("read_file", {"path": "no/such/file"})
        assert missing.is_error and "no/such/file" in text_of(missing)
        slow = await c.call_tool("run_code", {"code": "import time; time.sleep(30)", "timeout_s": 1})
        assert slow.is_error and "[error]\nTimeout" in text_of(slow)
    # a refused token: the tool call says so, the MCP server stays up
    async with mcp_client("--url", server.url, "--token", "wrong") as c:
        refused = await c.call_tool("run_code", {"code": "1"})
        assert refused.is_error and "401" in text_of(refused)


@pytest.mark.docker
async def test_long_output_is_truncated_with_a_note(server):
    async with mcp_client("--url", server.url, "--token", "tok1", "--max-output-chars", "2000") as c:
        r = await c.call_tool("run_shell", {"command": "seq 1 100000"})
        text = text_of(r)
        assert not r.is_error and len(text) < 2300
        assert text.startswith("[stdout]\n1\n2\n3\n") and text.endswith("99999\n100000\n[exit code 0]")
        assert "characters cut here: the output was 588895 characters, showing the first 1000 and the last 1000" in text


@pytest.mark.docker
async def test_without_a_url_it_runs_its_own_server():
    # a namespace of its own, so that only this server's containers are counted
    namespace = f"{NAMESPACE}-mcp"
    env = {
        "GROUNDLOOP_NAMESPACE": namespace,
        "GROUNDLOOP_SANDBOX_IMAGE": IMAGE,
        "GROUNDLOOP_POOL_SIZE": "1",
        **{k: v for k, v in os.environ.items() if k.startswith("DOCKER_")},
    }
    try:
        async with mcp_client(env=env) as c:
            r = await c.call_tool("run_code", {"code": "print('local')"})
            assert text_of(r) == "[stdout]\nlocal"
            assert await asyncio.to_thread(_containers, namespace)  # its pool and its session's sandbox
        # closing stdin ended it cleanly: its server removed its sandboxes before exiting
        assert await asyncio.to_thread(_containers, namespace) == []
    finally:
        await asyncio.to_thread(_containers, namespace, remove=True)


def _containers(namespace: str, *, remove: bool = False) -> list[str]:
    import docker

    with contextlib.closing(docker.from_env()) as client:
        found = client.api.containers(filters={"label": [f"groundloop.namespace={namespace}"], "status": "running"})
        if remove:
            for c in found:
                with contextlib.suppress(Exception):
                    client.api.remove_container(c["Id"], force=True)
        return [c["Id"] for c in found]


@pytest.mark.docker
async def test_streamable_http_transport(server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        GROUNDLOOP,
        "mcp",
        "--transport",
        "http",
        "--port",
        str(port),
        "--url",
        server.url,
        "--token",
        "tok1",
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(_listening(port), 60)
        async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=120) as c:
            assert {t.name for t in (await c.list_tools()).tools} == TOOLS
            r = await c.call_tool("run_code", {"code": "print('over http')"})
            assert text_of(r) == "[stdout]\nover http"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def _listening(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@pytest.mark.docker
async def test_a_session_the_server_ended_is_replaced_with_a_note():
    from groundloop.mcp.server import SessionHolder, build_server
    from support.env import server_settings
    from support.servers import run_server

    async with run_server(server_settings(idle_timeout_s=1.0)) as srv:
        holder = SessionHolder(srv.url, "tok1")
        try:
            async with Client(build_server(holder)) as c:  # in process: the stdio path is tested above
                first = await c.call_tool("run_code", {"code": "x = 1\nx"})
                assert text_of(first) == "[result]\n1"
                session = holder._session
                await asyncio.wait_for(_closed(session), 60)  # idle past 1 s: the server closes it (4410)
                again = await c.call_tool("run_code", {"code": "print('new')"})
                text = text_of(again)
                assert text.startswith("[groundloop: the previous session ended") and "4410" in text
                assert text.endswith("[stdout]\nnew") and holder._session is not session
        finally:
            await holder.close()


async def _closed(session) -> None:
    while session.closed is None:
        await asyncio.sleep(0.05)
