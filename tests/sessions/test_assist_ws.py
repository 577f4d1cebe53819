"""``assist`` end to end: a websockets client, the real server on uvicorn, a real Docker
sandbox, and the real anthropic SDK talking to the local fake Messages API."""

from __future__ import annotations

import asyncio

import anthropic
import pytest
from groundloop.server.metrics import Metrics
from groundloop.sessions.assist import AssistRunner
from support.env import server_settings
from support.fake_anthropic import Gate, stream_error, text
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = pytest.mark.docker


def done_of(frames):
    assert frames[-1]["type"] == "done"
    assert sum(1 for f in frames if f["type"] == "done") == 1
    return frames[-1]


@pytest.fixture
async def assist_server(fake):
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
    settings = server_settings(model="claude-test")
    metrics = Metrics()
    try:
        async with run_server(settings, metrics=metrics, assist=AssistRunner(settings, metrics, client=client)) as srv:
            yield srv
    finally:
        await client.close()


async def test_assist_success_and_state_kept(assist_server, fake):
    fake.add(text("Computing.\n```python\nanswer = 6 * 7\nprint('answer', answer)\n```\n", "That is all."))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        frames = await c.request("assist", prompt="what is 6*7?")
        done = done_of(frames)
        assert done["ok"] is True and done["iterations"] == 1, done
        assert done["code"] == "answer = 6 * 7\nprint('answer', answer)\n" and done["output"] == "answer 42\n"
        assert done["usage"]["output_tokens"] > 0 and done["timings"]["ttft_ms"] is not None
        assert "".join(f["text"] for f in frames if f["type"] == "token").endswith("That is all.")
        code = [f for f in frames if f["type"] == "code"]
        assert len(code) == 1 and code[0]["iteration"] == 1 and code[0]["language"] == "python"
        assert [f["text"] for f in frames if f["type"] == "stdout"] == ["answer 42\n"]
        assert all(f["iteration"] == 1 for f in frames if f["type"] in ("token", "stdout", "code", "attempt"))
        assert [f["ok"] for f in frames if f["type"] == "attempt"] == [True]
        # The code ran in the session's default context: its state is there to inspect.
        inspect = await c.request("run_code", code="print(answer)")
        assert WSClient.text(inspect) == "42\n"
    metrics = await asyncio.to_thread(_get, assist_server.http + "/metrics")
    assert "groundloop_assist_iterations_count 1.0" in metrics


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, headers={"Authorization": "Bearer tok1"}, timeout=30).text


async def test_assist_fixes_a_bug_on_the_second_try(assist_server, fake):
    fake.add(text("```python\nprint(undefined_name)\n```\n"), text("```python\nprint('fixed')\n```\n"))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        frames = await c.request("assist", prompt="print something", max_iterations=3)
        done = done_of(frames)
        assert done["ok"] is True and done["iterations"] == 2 and done["output"] == "fixed\n"
        attempts = [f for f in frames if f["type"] == "attempt"]
        assert [(a["iteration"], a["ok"]) for a in attempts] == [(1, False), (2, True)]
        assert attempts[0]["error"]["name"] == "NameError"
    assert "NameError" in fake.requests[1]["messages"][-1]["content"]


async def test_assist_exhausts_its_tries(assist_server, fake):
    fake.add(text("```python\nraise RuntimeError('one')\n```\n"), text("```python\nraise RuntimeError('two')\n```\n"))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        done = done_of(await c.request("assist", prompt="fail", max_iterations=2))
        assert done["ok"] is False and done["iterations"] == 2
        assert done["error"]["name"] == "RuntimeError" and "two" in done["error"]["message"]


async def test_stdout_before_the_last_token_over_the_socket(assist_server, fake):
    seen = asyncio.Event()
    fake.add(
        text("Here it goes:\n```python\nprint('early bird', flush=True)\n```\n", Gate(seen, 30.0), "And a last word.")
    )
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        rid = await c.send("assist", prompt="go")
        while True:
            f = await c.recv()
            if f.get("id") == rid and f["type"] == "stdout":
                seen.set()  # the model's last words are held until the client saw the output
            if f.get("id") == rid and f["type"] == "done":
                break
        frames = c.of(rid)
        types = [f["type"] for f in frames]
        assert done_of(frames)["ok"] is True
        last_token = max(i for i, t in enumerate(types) if t == "token")
        assert types.index("stdout") < last_token, types
        seqs = [f["seq"] for f in frames]
        assert seqs == sorted(seqs)


async def test_cancel_assist_during_generation(assist_server, fake):
    fake.add(text("Thinking hard", Gate(asyncio.Event(), 120.0), "never"))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        rid = await c.send("assist", prompt="think")
        while (await c.recv())["type"] != "token":
            pass
        await c.send("cancel", target=rid)
        done = done_of(await c.until_done(rid))
        assert done["ok"] is False and done["error"]["name"] == "Cancelled"
        await asyncio.wait_for(fake.disconnected.wait(), 10)
        assert fake.completed == 0
        # The session is still usable.
        assert WSClient.text(await c.request("run_code", code="print('still here')")) == "still here\n"


async def test_cancel_assist_during_execution(assist_server, fake):
    fake.add(text("```python\nimport time\nprint('sleeping', flush=True)\ntime.sleep(120)\n```\n"))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        rid = await c.send("assist", prompt="sleep")
        while True:
            f = await c.recv()
            if f.get("id") == rid and f["type"] == "stdout":
                break
        await c.send("cancel", target=rid)
        done = done_of(await c.until_done(rid))
        assert done["ok"] is False and done["error"]["name"] == "Cancelled"
        # The sleep was interrupted: the default context answers well before it would end.
        after = await c.request("run_code", code="print('awake')", timeout_s=60)
        assert done_of(after)["ok"] is True and WSClient.text(after) == "awake\n"


async def test_model_error_mid_stream_over_the_socket(assist_server, fake):
    fake.add(stream_error("Half a ", "sentence", error_type="overloaded_error", message="Overloaded"))
    async with await WSClient.connect(assist_server.url, token="tok1") as c:
        done = done_of(await c.request("assist", prompt="x"))
        assert done["ok"] is False and done["error"]["name"] == "ModelOverloaded"


async def test_llm_unavailable_without_a_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with run_server(server_settings()) as srv:
        async with await WSClient.connect(srv.url, token="tok1") as c:
            rid = await c.send("assist", prompt="hello")
            frames = await c.until_done(rid)
            done = done_of(frames)
            assert done["ok"] is False
            errors = [f for f in c.frames if f["type"] == "error"]
            assert errors and errors[0]["code"] == "llm_unavailable" and "ANTHROPIC_API_KEY" in errors[0]["message"]
            # Everything else keeps working.
            assert WSClient.text(await c.request("run_code", code="print(1)")) == "1\n"
