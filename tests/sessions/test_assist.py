"""The assist loop, driven by the real anthropic SDK against a local fake Messages API,
executing in a real Docker sandbox.

The ``execute`` adapter below stands in for the server's: it runs the code
with ``run_code`` in the session's default context, streams ``stdout`` /
``stderr`` / ``result`` frames tagged with the iteration, and interrupts the
sandbox request when it is cancelled.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from groundloop.server.metrics import Metrics
from groundloop.server.settings import Settings
from groundloop.sessions.assist import (
    FEEDBACK_BYTES,
    FEEDBACK_CODE_BYTES,
    FEEDBACK_TRACEBACK_BYTES,
    AssistRunner,
    LLMUnavailable,
    feedback_message,
    tail,
)
from groundloop.sessions.cache import ResultCache
from support.fake_anthropic import FakeAnthropic, Gate, dropped, http_error, stream_error, text

RID = "a1"


class Frames:
    """The frames ``emit`` received, with events tests can await."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []
        self._waits: list[tuple[Callable[[dict], bool], asyncio.Event]] = []

    async def __call__(self, frame: dict[str, Any]) -> None:
        assert frame["id"] == RID and "seq" not in frame
        self.items.append(frame)
        for pred, ev in self._waits:
            if pred(frame):
                ev.set()

    def when(self, pred: Callable[[dict], bool]) -> asyncio.Event:
        ev = asyncio.Event()
        self._waits.append((pred, ev))
        if any(pred(f) for f in self.items):
            ev.set()
        return ev

    def of(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        return [f for f in self.items if f["type"] == type_ and all(f.get(k) == v for k, v in match.items())]

    def text(self, type_: str = "stdout", **match: Any) -> str:
        return "".join(f["text"] for f in self.of(type_, **match))


class SandboxExecute:
    """An ``execute`` built on a real sandbox, as the server's will be."""

    def __init__(self, sandbox, emit: Frames):
        self.sandbox = sandbox
        self.emit = emit
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, code: str, language: str, iteration: int) -> dict[str, Any]:
        self.calls.append((code, language, iteration))
        rid = f"x{secrets.token_hex(4)}"
        out: list[str] = []

        async def on_event(ev: dict[str, Any]) -> None:
            if ev["ev"] == "out":
                for line in ev["lines"]:
                    out.append(line)
                    await self.emit({"type": ev["s"], "id": RID, "text": line, "iteration": iteration})
            elif ev["ev"] == "result":
                await self.emit(
                    {"type": "result", "id": RID, "data": ev["data"], "main": ev["main"], "iteration": iteration}
                )

        t0 = time.monotonic()
        try:
            done = await self.sandbox.request(
                "run_code", {"code": code, "language": language, "timeout_s": 30}, on_event, rid=rid, deadline_s=90
            )
        except asyncio.CancelledError:
            self.sandbox.cancel(rid)
            raise
        res = {
            "ok": done["ok"],
            "output": tail("".join(out), 4096),
            "error": done.get("error"),
            "duration_ms": (time.monotonic() - t0) * 1000,
        }
        if done.get("truncated"):
            res["truncated"] = True
        return res


@pytest.fixture
async def client(fake):
    c = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
    yield c
    await c.close()


def make_runner(client, **overrides) -> AssistRunner:
    settings = Settings.from_env({}, model="claude-test", **overrides)
    return AssistRunner(settings, Metrics(), client=client)


async def assist(
    runner: AssistRunner,
    sandbox,
    prompt: str = "do it",
    *,
    language: str = "python",
    max_iterations: int | None = 3,
    scope: str = "",
) -> tuple[dict[str, Any], Frames, SandboxExecute]:
    frames = Frames()
    execute = SandboxExecute(sandbox, frames)
    fields = await runner.run(
        rid=RID,
        prompt=prompt,
        language=language,
        max_iterations=max_iterations,
        context=None,
        emit=frames,
        execute=execute,
        scope=scope,
    )
    return fields, frames, execute


def metric(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not exposed")


def user_turns(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "user"]


# ---------------------------------------------------------------- success


@pytest.mark.docker
async def test_success_first_try(fake, client, sandbox):
    fake.add(text("I will add them up.\n", "```python\n", "print(sum(range(10)))\n", "```", "\nDone."))
    runner = make_runner(client)
    fields, frames, execute = await assist(runner, sandbox, "sum 0..9")

    assert fields["ok"] is True and fields["iterations"] == 1
    assert fields["code"] == "print(sum(range(10)))\n"
    assert fields["output"] == "45\n"
    assert "error" not in fields
    assert fields["usage"]["input_tokens"] > 0 and fields["usage"]["output_tokens"] > 0
    assert set(fields["timings"]) == {"ttft_ms", "generation_ms", "execution_ms"}
    assert fields["timings"]["ttft_ms"] is not None and fields["timings"]["execution_ms"] > 0

    assert frames.text("token") == "I will add them up.\n```python\nprint(sum(range(10)))\n```\nDone."
    assert all(f["iteration"] == 1 for f in frames.items)
    assert frames.of("code") == [
        {"type": "code", "id": RID, "code": "print(sum(range(10)))\n", "language": "python", "iteration": 1, "block": 0}
    ]
    assert frames.of("stdout") == [{"type": "stdout", "id": RID, "text": "45\n", "iteration": 1}]
    attempts = frames.of("attempt")
    assert len(attempts) == 1 and attempts[0]["ok"] is True and "error" not in attempts[0]
    assert frames.items[-1]["type"] == "attempt"
    assert len(execute.calls) == 1

    req = fake.requests[0]
    assert req["model"] == "claude-test" and req["stream"] is True
    assert req["messages"] == [{"role": "user", "content": "sum 0..9"}]
    assert "python" in req["system"]
    exposition = runner.metrics.exposition().decode()
    assert metric(exposition, 'groundloop_model_tokens_total{direction="input"}') == fields["usage"]["input_tokens"]
    assert metric(exposition, 'groundloop_model_tokens_total{direction="output"}') == fields["usage"]["output_tokens"]
    assert "groundloop_assist_iterations_count 1.0" in exposition
    assert "groundloop_model_first_token_seconds_count 1.0" in exposition


@pytest.mark.docker
async def test_bug_fixed_on_second_try(fake, client, sandbox):
    fake.add(
        text("```python\nvalues = [3, 4]\nprint('mean', sum(values) / 0)\n```\n"),
        text(
            "Oops, dividing by zero. Fixed:\n```python\nvalues = [3, 4]\nprint('mean', sum(values) / len(values))\n```\n"
        ),
    )
    fields, frames, execute = await assist(make_runner(client), sandbox, "mean of 3 and 4")

    assert fields["ok"] is True and fields["iterations"] == 2
    assert fields["output"] == "mean 3.5\n"
    assert "len(values)" in fields["code"]
    a1, a2 = frames.of("attempt")
    assert (a1["iteration"], a1["ok"], a1["error"]["name"]) == (1, False, "ZeroDivisionError")
    assert (a2["iteration"], a2["ok"]) == (2, True)
    assert [c["iteration"] for c in frames.of("code")] == [1, 2]
    assert frames.text("stdout", iteration=2) == "mean 3.5\n"

    # The first error went back to the model in the second request.
    assert len(fake.requests) == 2
    second = fake.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"].startswith("```python\nvalues = [3, 4]")
    feedback = second[2]["content"]
    assert "ZeroDivisionError" in feedback and "division by zero" in feedback
    assert "sum(values) / 0" in feedback  # the failing code
    assert frames.of("stdout", iteration=1) == []


@pytest.mark.docker
async def test_tries_exhausted_and_capped(fake, client, sandbox):
    for i in range(3):
        fake.add(text(f"Try {i}:\n```python\nprint('attempt {i}')\nraise ValueError('still wrong {i}')\n```\n"))
    runner = make_runner(client, max_iterations=2)
    fields, frames, execute = await assist(runner, sandbox, max_iterations=5)  # capped to 2

    assert fields["ok"] is False and fields["iterations"] == 2
    assert fields["error"]["name"] == "ValueError" and "still wrong 1" in fields["error"]["message"]
    assert "attempt 1" in fields["output"]
    assert len(fake.requests) == 2 and len(fake.replies) == 1
    assert [(a["iteration"], a["ok"]) for a in frames.of("attempt")] == [(1, False), (2, False)]
    assert len(execute.calls) == 2
    # Each request carries the whole story so far, the output tail included.
    last_turn = user_turns(fake.requests[1])[-1]
    assert "still wrong 0" in last_turn and "attempt 0" in last_turn


@pytest.mark.docker
async def test_syntax_error_is_a_try_without_a_sandbox_run(fake, client, sandbox):
    fake.add(text("```python\nprint('unclosed'\n```\n"), text("```python\nprint('closed')\n```\n"))
    fields, frames, execute = await assist(make_runner(client), sandbox)

    assert fields["ok"] is True and fields["iterations"] == 2
    assert execute.calls == [("print('closed')\n", "python", 2)]  # the broken code never reached the sandbox
    a1 = frames.of("attempt")[0]
    assert a1["ok"] is False and a1["error"]["name"] == "SyntaxError" and "never closed" in a1["error"]["message"]
    assert "never closed" in user_turns(fake.requests[1])[-1]


@pytest.mark.docker
async def test_javascript_syntax_check_and_run(fake, client, sandbox):
    fake.add(
        text("```js\nconst x = ;\n```\n"), text("```javascript\nconst xs = [1, 2, 3];\nconsole.log(xs.length)\n```\n")
    )
    fields, frames, execute = await assist(make_runner(client), sandbox, language="javascript")

    assert fields["ok"] is True and fields["iterations"] == 2, fields
    assert fields["output"] == "3\n"
    assert len(execute.calls) == 1 and execute.calls[0][1] == "javascript"
    a1 = frames.of("attempt")[0]
    assert a1["error"]["name"] == "SyntaxError" and "Unexpected token" in a1["error"]["message"]
    assert "Unexpected token" in user_turns(fake.requests[1])[-1]


@pytest.mark.docker
async def test_policy_rejects_before_running(fake, client, sandbox):
    fake.add(
        text("```python\nimport os\nos.system('id')\n```\n"),
        text("```python\nimport subprocess\nprint('no shell')\n```\n"),
    )
    runner = make_runner(client, policy_patterns=[r"\bos\.system\("])
    fields, frames, execute = await assist(runner, sandbox)

    assert fields["ok"] is True and fields["iterations"] == 2
    assert len(execute.calls) == 1
    a1 = frames.of("attempt")[0]
    assert a1["error"]["name"] == "PolicyViolation" and "forbidden pattern" in a1["error"]["message"]
    assert "forbidden pattern" in user_turns(fake.requests[1])[-1]


@pytest.mark.docker
async def test_last_block_counts_and_blocks_run_in_order(fake, client, sandbox):
    fake.add(
        text(
            "Setup:\n```python\nbase = 40\n```\n",
            "Example output:\n```text\n42\n```\n",
            "Use it:\n```python\nprint(base + 2)\n```\n",
        )
    )
    fields, frames, execute = await assist(make_runner(client), sandbox)

    assert fields["ok"] is True and fields["code"] == "print(base + 2)\n" and fields["output"] == "42\n"
    assert [c["block"] for c in frames.of("code")] == [0, 2]  # the text block is shown, never run
    assert [call[0] for call in execute.calls] == ["base = 40\n", "print(base + 2)\n"]
    assert len(frames.of("attempt")) == 1


@pytest.mark.docker
async def test_unclosed_block_at_the_end_of_the_stream_runs(fake, client, sandbox):
    fake.add(text("Here:\n```python\nprint('no closing fence')", stop_reason="max_tokens"))
    fields, frames, execute = await assist(make_runner(client), sandbox)
    assert fields["ok"] is True and fields["output"] == "no closing fence\n"
    assert frames.of("code")[0]["code"] == "print('no closing fence')\n"


def test_feedback_is_bounded():
    huge = "x" * 100_000 + "\nLAST LINE\n"
    msg = feedback_message(
        "print(1)\n" * 10_000,
        "python",
        {
            "ok": False,
            "output": huge,
            "ran": True,
            "error": {"name": "ValueError", "message": "boom", "traceback": "tb\n" * 5000},
        },
    )
    assert len(msg.encode()) < FEEDBACK_BYTES + FEEDBACK_CODE_BYTES + FEEDBACK_TRACEBACK_BYTES + 1024
    assert "LAST LINE" in msg and "ValueError: boom" in msg and "bytes cut" in msg


# ---------------------------------------------------------------- interleaving


@pytest.mark.docker
async def test_stdout_arrives_before_the_last_token(fake, client, sandbox):
    frames = Frames()
    stdout_seen = frames.when(lambda f: f["type"] == "stdout")
    # The model keeps talking after the block; the fake holds its last words until the
    # code's output has reached the client (or 30 s, after which the assertion fails).
    fake.add(
        text(
            "Running it now.\n```python\nprint('from the sandbox', flush=True)\n```\n",
            Gate(stdout_seen, 30.0),
            "While that runs, a note:",
            " the code prints one line.",
        )
    )
    execute = SandboxExecute(sandbox, frames)
    fields = await make_runner(client).run(
        rid=RID, prompt="hi", language="python", max_iterations=3, context=None, emit=frames, execute=execute
    )
    assert fields["ok"] is True
    types = [f["type"] for f in frames.items]
    last_token = max(i for i, t in enumerate(types) if t == "token")
    first_stdout = types.index("stdout")
    assert first_stdout < last_token, types
    assert frames.items[first_stdout]["text"] == "from the sandbox\n"
    assert types.index("code") < first_stdout


# ---------------------------------------------------------------- model errors


@pytest.mark.docker
async def test_model_error_in_the_middle_of_a_stream(fake, client, sandbox):
    fake.add(
        stream_error(
            "Let me write ",
            "it.\n```python\nprint('x')\n```\n",
            "And then",
            error_type="overloaded_error",
            message="Overloaded",
        )
    )
    fields, frames, execute = await assist(make_runner(client), sandbox)

    assert fields["ok"] is False
    assert fields["error"]["name"] == "ModelOverloaded"
    assert "middle of the stream" in fields["error"]["message"] and "Overloaded" in fields["error"]["message"]
    assert frames.text("token") == "Let me write it.\n```python\nprint('x')\n```\nAnd then"
    assert frames.of("attempt") == []


@pytest.mark.parametrize(
    ("status", "name"), [(529, "ModelOverloaded"), (429, "ModelRateLimited"), (401, "ModelAuthError")]
)
async def test_model_http_errors_after_the_sdk_retries(fake, status, name):
    fake.add(http_error(status), http_error(status))
    c = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=1)
    try:
        runner = make_runner(c)
        frames = Frames()

        async def never(code, language, iteration):  # no code is ever produced
            raise AssertionError("no execution expected")

        fields = await runner.run(
            rid=RID, prompt="x", language="python", max_iterations=3, context=None, emit=frames, execute=never
        )
    finally:
        await c.close()
    assert fields["ok"] is False and fields["error"]["name"] == name
    assert f"HTTP {status}" in fields["error"]["message"]
    assert frames.items == []
    # 401 is not retried by the SDK; 429 and 529 are, once here.
    assert len(fake.requests) == (1 if status == 401 else 2)


async def test_model_unreachable():
    async with FakeAnthropic() as f:
        url = f.url  # closed at once: nothing listens there any more
    c = anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0)
    try:

        async def never(code, language, iteration):
            raise AssertionError("no execution expected")

        fields = await make_runner(c).run(
            rid=RID, prompt="x", language="python", max_iterations=1, context=None, emit=Frames(), execute=never
        )
    finally:
        await c.close()
    assert fields["ok"] is False and fields["error"]["name"] == "ModelUnreachable"


async def test_connection_cut_mid_stream(fake, client):
    fake.add(dropped("Here is a ", "partial"))
    frames = Frames()

    async def never(code, language, iteration):
        raise AssertionError("no execution expected")

    fields = await make_runner(client).run(
        rid=RID, prompt="x", language="python", max_iterations=3, context=None, emit=frames, execute=never
    )
    assert fields["ok"] is False and fields["error"]["name"] == "ModelUnreachable", fields
    assert frames.text("token") == "Here is a partial"


# ---------------------------------------------------------------- cancel


async def cancel_when(event: asyncio.Event, timeout: float, run) -> None:
    """Start ``run`` (an assist coroutine), cancel it once ``event`` is set; it must end cancelled."""
    task = asyncio.create_task(run)
    await asyncio.wait_for(event.wait(), timeout)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_during_generation_closes_the_stream(fake, client):
    frames = Frames()
    first_token = frames.when(lambda f: f["type"] == "token")
    hold = asyncio.Event()  # never set: the model "thinks" until the client hangs up
    fake.add(text("Let me think", Gate(hold, 120.0), "never sent"))

    async def never(code, language, iteration):
        raise AssertionError("no execution expected")

    await cancel_when(
        first_token,
        30,
        make_runner(client).run(
            rid=RID, prompt="x", language="python", max_iterations=3, context=None, emit=frames, execute=never
        ),
    )
    await asyncio.wait_for(fake.disconnected.wait(), 10)  # the HTTP stream was closed
    assert frames.text("token") == "Let me think"
    assert fake.completed == 0


@pytest.mark.docker
async def test_cancel_during_execution_interrupts_the_sandbox(fake, client, sandbox):
    frames = Frames()
    started = frames.when(lambda f: f["type"] == "stdout" and f["text"] == "start\n")
    fake.add(
        text("```python\nimport time\nprint('start', flush=True)\ntime.sleep(120)\nprint('end')\n```\n", "It sleeps.")
    )
    execute = SandboxExecute(sandbox, frames)
    await cancel_when(
        started,
        60,
        make_runner(client).run(
            rid=RID, prompt="x", language="python", max_iterations=3, context=None, emit=frames, execute=execute
        ),
    )
    assert frames.of("attempt") == []
    # The sleeping code was interrupted: the same context answers well before the sleep would end.
    done = await sandbox.request("run_code", {"code": "print('after')", "timeout_s": 60}, None, deadline_s=90)
    assert done["ok"] is True, done


# ---------------------------------------------------------------- no code, no model, cache


@pytest.mark.docker
async def test_reply_without_code_ends_the_loop(fake, client, sandbox):
    fake.add(text("A list is mutable; a tuple is not."))
    fields, frames, execute = await assist(make_runner(client), sandbox)
    assert fields["ok"] is True and fields["iterations"] == 1 and fields["code"] is None
    assert frames.of("attempt") == [] and execute.calls == []


async def test_unavailable_without_a_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    runner = AssistRunner(Settings.from_env({}), Metrics())
    assert runner.available is False

    async def never(*a):
        raise AssertionError("no execution expected")

    with pytest.raises(LLMUnavailable, match="ANTHROPIC_API_KEY"):
        await runner.run(
            rid=RID, prompt="x", language="python", max_iterations=1, context=None, emit=Frames(), execute=never
        )
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert runner.available is True


@pytest.mark.docker
async def test_cache_hit_skips_the_model_and_runs_again_in_the_callers_sandbox(fake, client, sandbox):
    """A hit replays the model's code, never another run's output: the code runs again here, so what it prints
    comes from this sandbox's state (issue 21, item 1: a cached result served across users and sessions)."""
    fake.add(text("```python\nprint(open('/workspace/who.txt').read())\n```\n"))
    runner = AssistRunner(
        Settings.from_env({}, model="claude-test"), Metrics(), client=client, cache=ResultCache(8, 60)
    )
    assert (await sandbox.request("write_file", {"path": "who.txt", "content": "alice"}))["ok"]
    first, _, _ = await assist(runner, sandbox, "who am i", scope="alice")
    assert first["ok"] and first["output"] == "alice\n" and "cached" not in first
    assert (await sandbox.request("write_file", {"path": "who.txt", "content": "carol"}))["ok"]
    second, frames, execute = await assist(runner, sandbox, "who am i", scope="alice")
    assert second["cached"] is True and second["code"] == first["code"]
    assert second["output"] == "carol\n" and frames.text() == "carol\n"  # run again, not replayed
    assert len(fake.requests) == 1 and len(execute.calls) == 1
    assert frames.of("code")[0]["cached"] is True and [f["ok"] for f in frames.of("attempt")] == [True]


@pytest.mark.docker
async def test_cache_is_per_user_and_a_failed_hit_is_evicted(fake, client, sandbox):
    fake.add(text("```python\nprint(open('/workspace/mine.txt').read())\n```\n"))
    fake.add(text("```python\nprint('bob asked the model')\n```\n"))
    fake.add(text("```python\nprint('asked again')\n```\n"))
    runner = AssistRunner(
        Settings.from_env({}, model="claude-test"), Metrics(), client=client, cache=ResultCache(8, 60)
    )
    assert (await sandbox.request("write_file", {"path": "mine.txt", "content": "secret"}))["ok"]
    first, _, _ = await assist(runner, sandbox, "read it", scope="alice")
    assert first["ok"] and first["output"] == "secret\n"
    # Another user with the same prompt is a miss: the model is asked, nothing of alice's comes back.
    bob, bob_frames, _ = await assist(runner, sandbox, "read it", scope="bob")
    assert "cached" not in bob and bob["output"] == "bob asked the model\n" and len(fake.requests) == 2
    # A hit whose run fails is answered as it is and evicted.
    assert (await sandbox.request("delete_file", {"path": "mine.txt"}))["ok"]
    again, _, _ = await assist(runner, sandbox, "read it", scope="alice")
    assert again["cached"] is True and again["ok"] is False and again["error"]["name"] == "FileNotFoundError"
    third, _, _ = await assist(runner, sandbox, "read it", scope="alice")
    assert "cached" not in third and third["output"] == "asked again\n" and len(fake.requests) == 3
