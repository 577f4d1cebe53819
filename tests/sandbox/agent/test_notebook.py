"""Notebook-style cells in the agent's Python worker, without Docker and without IPython (the minimal
image's case): the local backend runs the agent with this interpreter, which has no IPython. The same
with IPython, in the standard image, is tests/server/test_notebook_ws.py."""

from __future__ import annotations

import importlib.util

import pytest
from groundloop.sandbox.local_backend import LocalBackend
from groundloop.sandbox.settings import SandboxSettings
from support.collect import Collector

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("IPython") is not None,
    reason="this interpreter has IPython: these test the worker without",
)


@pytest.fixture
async def sb():
    backend = LocalBackend(SandboxSettings(backend="local"))
    sandbox = await backend.start("test-notebook")
    yield sandbox
    await sandbox.close()
    await backend.close()


async def run(sb, code: str) -> tuple[dict, Collector]:
    ev = Collector()
    done = await sb.request("run_code", {"code": code}, ev, deadline_s=60)
    return done, ev


def order(ev: Collector) -> list:
    """stdout lines and results, in the order they came."""
    return [
        ("out", line) if e["ev"] == "out" else ("result", e["data"].get("text/plain"), e["main"])
        for e in ev.events
        if e["ev"] in ("out", "result")
        for line in (e.get("lines") or [None])
    ]


async def test_an_indented_cell_is_dedented(sb):
    done, ev = await run(sb, "    x = 2\n    if x:\n        print('in')\n    x * 21\n")
    assert done["ok"], done
    assert ev.text() == "in\n" and ev.results()[-1]["data"] == {"text/plain": "42"}


async def test_display_calls_and_the_value_come_in_order_with_the_output(sb):
    done, ev = await run(sb, "print('a')\ndisplay(1)\nprint('b')\ndisplay('two', 3)\n'last'")
    assert done["ok"], done
    assert order(ev) == [
        ("out", "a\n"),
        ("result", "1", False),
        ("out", "b\n"),
        ("result", "'two'", False),
        ("result", "3", False),
        ("result", "'last'", True),
    ]


async def test_reprs_without_ipython(sb):
    code = (
        "class Rich:\n"
        "    def _repr_html_(self): return '<i>r</i>'\n"
        "    def _repr_latex_(self): return '$r$'\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/markdown': '*r*'}, {}\n"
        "    def __repr__(self): return 'Rich()'\n"
        "Rich()"
    )
    done, ev = await run(sb, code)
    assert done["ok"], done
    assert ev.results()[-1]["data"] == {
        "text/plain": "Rich()",
        "text/markdown": "*r*",
        "text/html": "<i>r</i>",
        "text/latex": "$r$",
        "image/png": "iVBORw==",
    }


async def test_a_trailing_semicolon_hides_the_value(sb):
    for code in ("1 + 1;", "1 + 1;  # a comment", "x = [1]; x;"):
        done, ev = await run(sb, code)
        assert done["ok"] and ev.results() == [], (code, ev.events)
    done, ev = await run(sb, "'a;b'")
    assert ev.results()[-1]["data"]["text/plain"] == "'a;b'"


async def test_shell_lines_need_ipython_and_say_so(sb):
    done, _ = await run(sb, "!echo hi")
    assert not done["ok"] and done["error"]["name"] == "SyntaxError"
    assert "need IPython" in done["error"]["message"]
    done, _ = await run(sb, "x = (1,\n")  # an ordinary syntax error is left as it is
    assert done["error"]["name"] == "SyntaxError" and "IPython" not in done["error"]["message"]


async def test_a_task_started_in_one_cell_is_awaited_in_the_next(sb):
    done, _ = await run(
        sb, "import asyncio\nt = asyncio.ensure_future(asyncio.sleep(0.01, result=5))\nawait asyncio.sleep(0)"
    )
    assert done["ok"], done
    done, ev = await run(sb, "await t")
    assert done["ok"], done
    assert ev.results()[-1]["data"]["text/plain"] == "5"
    done, ev = await run(sb, "asyncio.run(asyncio.sleep(0, result=6))")  # a loop of its own, in a plain cell
    assert ev.results()[-1]["data"]["text/plain"] == "6"
    done, ev = await run(sb, "await asyncio.sleep(0, result=7)")
    assert ev.results()[-1]["data"]["text/plain"] == "7"


async def test_forged_acknowledged_results_cannot_block_the_agent(sb):
    # A cell that writes, on the worker's answer pipe, more acknowledged results than the command pipe can hold
    # acknowledgements (64 KiB): the agent must not block writing them, and the context goes on.
    forge = (
        "import os, sys\n"
        "fd = sys.modules['groundloop_agent.notebook']._send.__globals__['RES_FD']\n"
        'line = b\'{"t":"result","data":{},"main":false,"ack":true}\\n\'\n'
        "for _ in range(20):\n"
        "    os.write(fd, line * 5000)\n"
        "print('forged')\n"
    )
    done, ev = await run(sb, forge)
    assert done["ok"], done
    assert ev.text() == "forged\n"
    big = "x = " + repr("y" * 50_000) + "\nlen(x)"  # a command larger than the pipe, behind the forged lines
    done, ev = await run(sb, big)
    assert done["ok"], done
    assert ev.results()[-1]["data"]["text/plain"] == "50000"
    done, ev = await run(sb, "print('a'); display(1); print('b')")
    assert done["ok"] and [e["ev"] for e in ev.events if e["ev"] in ("out", "result")] == ["out", "result", "out"]
