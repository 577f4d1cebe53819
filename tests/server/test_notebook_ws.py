"""Notebook-style Python over the real WebSocket, in the standard image, under runc and runsc (gVisor).

What a new user types in a Jupyter cell works the same here: matplotlib figures arrive as ``image/png``
while the cell still runs, DataFrames as HTML tables, every ``display()`` as a result in order, indented
cells run, ``!`` and ``%`` lines are IPython's (sandbox/agent/groundloop_agent/notebook.py).
"""

from __future__ import annotations

import base64

import pytest
import pytest_asyncio
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def client(request):
    """One session per runtime, shared by the module's tests (a context's state is part of what is tested)."""
    settings = server_settings(sandbox=sandbox_settings(pool_size=1, runtime=request.param))
    async with run_server(settings) as srv, await WSClient.connect(srv.url, token="tok1") as c:
        assert c.ready["sandbox"]["runtime"] == request.param
        # The tests need the standard profile's packages: a minimal image fails here, loudly.
        frames = await c.request("run_code", code="import IPython, matplotlib, pandas; IPython.__version__")
        assert frames[-1]["ok"], f"the sandbox image lacks the standard profile's packages: {frames[-1]}"
        yield c


def results(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "result"]


def stdout(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "stdout")


async def test_a_figure_arrives_as_png_while_the_cell_still_prints(client):
    # The cell waits for a file that only the test writes once it has seen the figure: the PNG can
    # only have arrived while the cell was still running.
    rid = await client.send(
        "run_code",
        code=(
            "import os, time\n"
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 4, 9, 16])\n"
            "plt.title('squares')\n"
            "plt.show()\n"
            "print('shown', flush=True)\n"
            "while not os.path.exists('/workspace/seen-figure'):\n"
            "    time.sleep(0.02)\n"
            "print('after')\n"
        ),
        timeout_s=120,
    )
    figure = None
    while figure is None:
        frame = await client.recv()
        assert not (frame.get("id") == rid and frame["type"] == "done"), f"the cell ended before its figure: {frame}"
        if frame.get("id") == rid and frame["type"] == "result":
            figure = frame
    assert base64.b64decode(figure["data"]["image/png"]).startswith(PNG_MAGIC)
    assert figure["main"] is False and "Figure" in figure["data"]["text/plain"]
    await client.call("write_file", path="seen-figure", content="")
    frames = await client.until_done(rid)
    assert frames[-1]["ok"], frames[-1]
    assert stdout(frames) == "shown\nafter\n"
    assert len(results(frames)) == 1  # shown once: the inline backend closed it, the cell's end adds none


async def test_a_figure_left_open_is_sent_when_the_cell_ends(client):
    frames = await client.request("run_code", code="plt.bar(['a', 'b'], [3, 5]);")
    assert frames[-1]["ok"], frames[-1]
    (figure,) = results(frames)  # the `;` hid the bars' repr; the figure still comes
    assert base64.b64decode(figure["data"]["image/png"]).startswith(PNG_MAGIC)
    frames = await client.request("run_code", code="plt.plot([2, 1])")
    value, figure = results(frames)  # the value first, then the figure the cell's end sends, as in Jupyter
    assert value["main"] is True and "Line2D" in value["data"]["text/plain"]
    assert figure["main"] is False and "image/png" in figure["data"]


async def test_a_dataframe_comes_as_an_html_table_and_text(client):
    frames = await client.request(
        "run_code", code="import pandas as pd\ndf = pd.DataFrame({'x': [1, 2, 3], 'y': ['a', 'b', 'c']})\ndf"
    )
    assert frames[-1]["ok"], frames[-1]
    (main,) = results(frames)
    assert main["main"] is True
    assert "<table" in main["data"]["text/html"] and "<th>y</th>" in main["data"]["text/html"]
    assert main["data"]["text/plain"].split("\n")[0].split() == ["x", "y"]


async def test_two_displays_and_a_value_are_three_results_in_order(client):
    frames = await client.request(
        "run_code",
        code=(
            "from IPython.display import HTML, Markdown\n"
            "print('first')\n"
            "display(HTML('<b>one</b>'))\n"
            "print('second')\n"
            "display(Markdown('*two*'))\n"
            "6 * 7\n"
        ),
    )
    assert frames[-1]["ok"], frames[-1]
    kinds = [(f["type"], f.get("text")) for f in frames if f["type"] in ("stdout", "result")]
    assert kinds == [
        ("stdout", "first\n"),
        ("result", None),
        ("stdout", "second\n"),
        ("result", None),
        ("result", None),
    ]
    one, two, value = results(frames)
    assert one["data"]["text/html"] == "<b>one</b>" and one["main"] is False
    assert two["data"]["text/markdown"] == "*two*" and two["main"] is False
    assert value["data"] == {"text/plain": "42"} and value["main"] is True


async def test_displays_with_an_id_are_updated_and_clear_output_is_a_frame(client):
    frames = await client.request(
        "run_code",
        code=(
            "from IPython.display import display, update_display, clear_output\n"
            "print('before')\n"
            "display('step 1', display_id='progress')\n"
            "update_display('step 2', display_id='progress')\n"
            "handle = display('made', display_id=True)\n"
            "handle.update('changed')\n"
            "clear_output()\n"
            "print('cleared')\n"
            "clear_output(wait=True)\n"
            "print('last')\n"
        ),
    )
    assert frames[-1]["ok"], frames[-1]
    shown = [
        (
            f["type"],
            f.get("text") or (f.get("data") or {}).get("text/plain"),
            f.get("display_id"),
            f.get("update"),
            f.get("wait"),
        )
        for f in frames
        if f["type"] in ("stdout", "result", "clear_output")
    ]
    made = shown[3][2]
    assert isinstance(made, str) and len(made) >= 8  # the id IPython made (display_id=True)
    assert shown == [
        ("stdout", "before\n", None, None, None),
        ("result", "'step 1'", "progress", None, None),
        ("result", "'step 2'", "progress", True, None),
        ("result", "'made'", made, None, None),
        ("result", "'changed'", made, True, None),
        ("clear_output", None, None, None, False),
        ("stdout", "cleared\n", None, None, None),
        ("clear_output", None, None, None, True),
        ("stdout", "last\n", None, None, None),
    ]
    # A later request updates a display of an earlier one: the frame says which.
    frames = await client.request("run_code", code="update_display('step 3', display_id='progress')")
    assert frames[-1]["ok"], frames[-1]
    (update,) = results(frames)
    assert (
        update["display_id"] == "progress" and update["update"] is True and update["data"]["text/plain"] == "'step 3'"
    )


async def test_an_indented_cell_runs(client):
    frames = await client.request(
        "run_code", code="    total = 0\n    for i in range(4):\n        total += i\n    total\n"
    )
    assert frames[-1]["ok"], frames[-1]
    assert results(frames)[-1]["data"]["text/plain"] == "6"


async def test_shell_lines_and_magics(client):
    frames = await client.request("run_code", code="!echo hi\nfiles = !ls /\n'etc' in files")
    assert frames[-1]["ok"], frames[-1]
    assert stdout(frames) == "hi\n"
    assert results(frames)[-1]["data"]["text/plain"] == "True"
    frames = await client.request("run_code", code="%cd /tmp\n%pwd")
    assert frames[-1]["ok"], frames[-1]
    assert results(frames)[-1]["data"]["text/plain"] == "'/tmp'"
    frames = await client.request("run_code", code="pwd")  # automagic: a magic's name alone, not bound
    assert results(frames)[-1]["data"]["text/plain"] == "'/tmp'"
    frames = await client.request("run_code", code="pwd = 'mine'\npwd")  # bound: the user's value
    assert results(frames)[-1]["data"]["text/plain"] == "'mine'"
    await client.call("run_code", code="del pwd\n%cd /workspace")
    frames = await client.request("run_code", code="%%writefile /workspace/hello.txt\nhello from a cell magic\n")
    assert frames[-1]["ok"], frames[-1]
    done = await client.call("read_file", path="hello.txt")
    assert done["content"] == "hello from a cell magic\n"
    frames = await client.request("run_code", code="%nosuchmagic")
    assert not frames[-1]["ok"] and frames[-1]["error"]["name"] == "UsageError", frames[-1]


async def test_rich_reprs_latex_svg_json_and_mimebundle(client):
    frames = await client.request(
        "run_code",
        code=(
            "class Rich:\n"
            '    def _repr_svg_(self): return \'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'\n'
            "    def _repr_latex_(self): return r'$\\alpha$'\n"
            "    def _repr_json_(self): return {'k': [1, 2]}\n"
            "class Bundle:\n"
            "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
            "        return {'text/plain': 'bundle', 'text/markdown': '**b**'}\n"
            "display(Bundle())\n"
            "Rich()\n"
        ),
    )
    assert frames[-1]["ok"], frames[-1]
    bundle, rich = results(frames)
    assert bundle["data"] == {"text/plain": "bundle", "text/markdown": "**b**"}
    assert rich["data"]["image/svg+xml"].startswith("<svg")
    assert rich["data"]["text/latex"] == "$\\alpha$"
    assert rich["data"]["application/json"] == {"k": [1, 2]}


async def test_svg_figures_when_asked(client):
    frames = await client.request(
        "run_code",
        code="%config InlineBackend.figure_formats = ['png', 'svg']\nplt.plot([0, 1]); plt.show()\n",
    )
    assert frames[-1]["ok"], frames[-1]
    (figure,) = results(frames)
    assert "<svg" in figure["data"]["image/svg+xml"]
    assert base64.b64decode(figure["data"]["image/png"]).startswith(PNG_MAGIC)
    await client.call("run_code", code="%config InlineBackend.figure_formats = ['png']")


async def test_pip_magic_runs_pip(client):
    # No network in the sandbox: what matters is that IPython's %pip ran pip, whose answer is shown.
    frames = await client.request("run_code", code="%pip --version", timeout_s=120)
    assert frames[-1]["ok"], frames[-1]
    assert stdout(frames).startswith("pip ")


async def test_plain_values_stay_lean_and_state_is_kept(client):
    frames = await client.request("run_code", code="1 + 1")
    assert [r["data"] for r in results(frames)] == [{"text/plain": "2"}]
    frames = await client.request("run_code", code="{'a': 1}")
    assert results(frames)[-1]["data"] == {"text/plain": "{'a': 1}", "application/json": {"a": 1}}
    frames = await client.request("run_code", code="_")  # the last value, as in IPython
    assert results(frames)[-1]["data"]["text/plain"] == "{'a': 1}"
    frames = await client.request("run_code", code="exit()")  # still ends the cell, as before IPython came in
    assert frames[-1]["error"]["name"] == "SystemExit"
