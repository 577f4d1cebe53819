"""The browser page (static/) in real headless Chromium against a real server and real Docker.

Each test loads the page from a real uvicorn (``run_server``), connects with
the subprotocol token scheme through the page's own token field, and drives
the page's controls. What is checked is what a user sees: streamed lines,
rendered results, cell states, the connection status.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from support.browser import (
    TIMEOUT_MS,
    cell,
    chromium,
    chromium_missing,
    open_page,
    screenshot,
    set_code,
    stats,
    stream_text,
    wait_cell_state,
    wait_state,
)
from support.env import server_settings
from support.servers import run_server

pytestmark = [pytest.mark.browser, pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or "")]
docker = pytest.mark.docker


@contextlib.asynccontextmanager
async def static_http():
    """static/ served by the stdlib's HTTP server on a free loopback port, in a thread; yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = Path(__file__).resolve().parents[2] / "static"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextlib.asynccontextmanager
async def _closing(client):
    try:
        yield client
    finally:
        await client.close()


def expect(locator):
    from playwright.async_api import expect as pw_expect

    pw_expect.set_options(timeout=TIMEOUT_MS)  # shared CI machines: be patient, never sleep
    return pw_expect(locator)


GATED = """import os, sys, time
print("line 1", flush=True)
print("careful: this goes to stderr", file=sys.stderr, flush=True)
while not os.path.exists("/workspace/go"):
    time.sleep(0.05)
print("line 2")

class Squares:
    def _repr_html_(self):
        rows = "".join(f"<tr><td>{n}</td><td>{n * n}</td></tr>" for n in range(1, 5))
        return f"<table><tr><th>n</th><th>square</th></tr>{rows}</table>"

Squares()
"""


@docker
async def test_run_streams_lines_and_renders_a_rich_result(server):
    async with chromium() as browser, open_page(browser, server) as page:
        await set_code(page, GATED)
        await page.get_by_test_id("run").click()
        run = await cell(page)
        # The first line is on screen while the program is still running: it streamed.
        await expect(run.locator(".out-stdout").first).to_have_text("line 1\n", timeout=TIMEOUT_MS)
        assert await run.get_attribute("data-state") == "running"
        err = run.locator(".out-stderr")
        await expect(err).to_have_text("careful: this goes to stderr\n")
        colors = await run.evaluate(
            "el => [...el.querySelectorAll('.out-stdout, .out-stderr')].map(n => getComputedStyle(n).color)"
        )
        assert len(set(colors)) == 2, colors  # stdout and stderr look different

        # A shell command (typed into the command line) opens the gate.
        await page.get_by_test_id("command").fill("touch /workspace/go && echo gate open")
        await page.get_by_test_id("exec").click()
        assert await wait_cell_state(run, "ok", "error") == "ok"
        assert await stream_text(run) == "line 1\nline 2\n"

        frame = run.locator("iframe.result-frame")
        assert await frame.get_attribute("sandbox") == ""
        await expect(page.frame_locator("iframe.result-frame").locator("th").nth(1)).to_have_text("square")
        assert await run.locator(".result").get_attribute("data-mime") == "text/html"
        assert re.fullmatch(r"[\d.]+ (ms|s)", (await run.get_by_test_id("duration").text_content()).strip())

        shell = page.locator("article.cell-exec")
        assert await wait_cell_state(shell, "ok") == "ok"
        await expect(shell.locator(".out-stdout")).to_have_text("gate open\n")
        await expect(shell.locator(".exit")).to_have_text("exit 0")

        # The files list was refreshed after the runs; the status bar has a round-trip time.
        await expect(page.get_by_test_id("files").locator('[data-name="go"]')).to_be_visible()
        await expect(page.get_by_test_id("rtt")).to_have_text(re.compile(r"\d"))
        await expect(page.get_by_test_id("session")).not_to_have_text("–")
        await screenshot(page, "page-after-run.png")
        assert page.js_errors == []


@docker
async def test_results_errors_and_javascript(server):
    async with chromium() as browser, open_page(browser, server) as page:
        await set_code(page, '{"answer": 42, "items": [1, 2]}')
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        pretty = await (await cell(page)).locator(".result-json").text_content()
        assert pretty == '{\n  "answer": 42,\n  "items": [\n    1,\n    2\n  ]\n}'

        # A PNG made with the stdlib: the page's own example.
        await page.get_by_test_id("examples").select_option("Draw a PNG")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        img = (await cell(page)).locator("img.result-img")
        await expect(img).to_have_attribute("src", re.compile(r"^data:image/png;base64,iVBOR"))
        await page.wait_for_function("img => img.complete && img.naturalWidth === 240", arg=await img.element_handle())

        await set_code(page, "def f(x):\n    return 1 / x\n\nprint('before')\nf(0)\n")
        await page.get_by_test_id("run").click()
        failed = await cell(page)
        assert await wait_cell_state(failed, "error") == "error"
        await expect(failed.locator(".out-stdout")).to_have_text("before\n")
        await expect(failed.locator(".error-title")).to_contain_text("ZeroDivisionError")
        await expect(failed.locator(".traceback pre")).to_contain_text("return 1 / x")

        await set_code(page, "console.log('hi from node'); ({n: 6 * 7})", "javascript")
        assert await page.get_by_test_id("language").input_value() == "javascript"
        await page.get_by_test_id("run").click()
        js = await cell(page)
        assert await wait_cell_state(js, "ok") == "ok"
        await expect(js.locator(".badge")).to_contain_text("javascript")
        assert await stream_text(js) == "hi from node\n"
        assert page.js_errors == []


@docker
async def test_shell_command_and_exit_code(server):
    async with chromium() as browser, open_page(browser, server) as page:
        await page.get_by_test_id("command").fill("echo one; echo two >&2; printf 'x' > /workspace/made.txt; exit 3")
        await page.get_by_test_id("command").press("Enter")
        shell = await cell(page)
        await wait_cell_state(shell, "ok", "error")
        await expect(shell.locator(".exit")).to_have_text("exit 3")
        assert await stream_text(shell) == "one\n"
        assert await stream_text(shell, "stderr") == "two\n"
        files = page.get_by_test_id("files")
        await expect(files.locator('[data-name="made.txt"]')).to_be_visible()
        # With an empty command line, the editor's text runs as a shell script.
        await page.get_by_test_id("command").fill("")
        await set_code(page, "echo from the editor\nls /workspace")
        await page.get_by_test_id("exec").click()
        script = await cell(page)
        assert await wait_cell_state(script, "ok") == "ok"
        assert await stream_text(script) == "from the editor\nmade.txt\n"
        # Clicking a file shows its content.
        await files.locator('[data-name="made.txt"]').click()
        shown = page.locator("article.cell-read_file")
        assert await wait_cell_state(shown, "ok") == "ok"
        assert await stream_text(shown) == "x"


@docker
async def test_cancel_a_long_run(server):
    async with chromium() as browser, open_page(browser, server) as page:
        cancel = page.get_by_test_id("cancel")
        await expect(cancel).to_be_disabled()
        await set_code(page, "import time\nprint('started', flush=True)\ntime.sleep(600)\nprint('never')\n")
        await page.get_by_test_id("run").click()
        run = await cell(page)
        await expect(run.locator(".out-stdout")).to_have_text("started\n")
        await expect(cancel).to_be_enabled()
        await cancel.click()
        assert await wait_cell_state(run, "cancelled") == "cancelled"
        await expect(cancel).to_be_disabled()
        assert await stream_text(run) == "started\n"
        # The sandbox is still usable.
        await set_code(page, "print('after the cancel')")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        assert await stream_text(await cell(page)) == "after the cancel\n"


RESUME = """import os, time
print("before the drop", flush=True)
while not os.path.exists("/workspace/gate"):
    time.sleep(0.05)
for i in range(1, 41):
    print(f"while away {i}")
"done"
"""


async def run_then_drop(page, session, code: str, first_line: str):
    """Run ``code`` in the page until ``first_line`` shows, then hold the page's reconnect and cut
    the transport from the server side (no close frame); the run (which waits for
    /workspace/gate) is let finish while the page is away. Returns its cell and request id."""
    await set_code(page, code)
    await page.get_by_test_id("run").click()
    run = await cell(page)
    await expect(run.locator(".out-stdout")).to_have_text(first_line)
    rid = await run.get_attribute("data-request-id")
    await page.evaluate("() => { window.groundloop.client.autoReconnect = false; }")
    session.conn.abort()
    await asyncio.wait_for(session.detached.wait(), 60)
    await wait_state(page, "offline")
    await asyncio.wait_for(session.sb.request("exec", {"command": "touch /workspace/gate", "timeout_s": 30}), 60)

    async def ended() -> None:  # a run has no task of its own: it ends when it leaves inflight
        while rid in session.inflight:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(ended(), 60)  # the run ended while the page was away
    return run, rid


@docker
async def test_resume_after_a_server_side_disconnect(server):
    """The server drops the socket mid-run; output produced meanwhile is replayed once, in order."""
    async with chromium() as browser, open_page(browser, server) as page:
        sid = (await stats(page))["sessionId"]
        session = server.state.manager.sessions[sid]
        run, rid = await run_then_drop(page, session, RESUME, "before the drop\n")
        assert await run.get_attribute("data-state") == "running"

        await page.evaluate("() => { const c = window.groundloop.client; c.autoReconnect = true; c.open(); }")
        await wait_state(page, "open")
        assert await wait_cell_state(run, "ok") == "ok"
        expected = "before the drop\n" + "".join(f"while away {i}\n" for i in range(1, 41))
        assert await stream_text(run) == expected
        await expect(run.locator(".result-text")).to_have_text("'done'")
        s = await stats(page)
        assert s["sessionId"] == sid and s["resumes"] == 1 and s["duplicates"] == 0 and s["seqJumps"] == 0
        await expect(page.get_by_test_id("status")).to_contain_text("resumed")

        # A drop in the middle of a stream, with the automatic reconnect on.
        await set_code(page, "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.02)\n")
        await page.get_by_test_id("run").click()
        second = await cell(page)
        await expect(second.locator(".out-stdout")).to_contain_text("3\n")
        session.conn.abort()
        assert await wait_cell_state(second, "ok") == "ok"
        assert await stream_text(second) == "".join(f"{i}\n" for i in range(30))
        await wait_state(page, "open")
        s = await stats(page)
        assert s["sessionId"] == sid and s["resumes"] == 2 and s["duplicates"] == 0 and s["seqJumps"] == 0

        # A clean close from the server (a close frame, as for a slow consumer) resumes too.
        await session.conn.close(4408, "test: slow consumer")
        await expect(page.locator(".notice-muted").last).to_contain_text("session resumed")
        await wait_state(page, "open")
        assert (await stats(page))["resumes"] == 3

        # The page-side hook (a network drop) resumes the same way.
        await page.evaluate("() => window.groundloop.dropConnection()")
        await page.wait_for_function("() => window.groundloop.stats().resumes === 4")
        await wait_state(page, "open")
        await set_code(page, "print('after all that')")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        assert await stream_text(await cell(page)) == "after all that\n"
        s = await stats(page)
        assert s["sessionId"] == sid and s["duplicates"] == 0 and s["seqJumps"] == 0
        assert page.js_errors == []


GAP = """import os, time
print("start", flush=True)
while not os.path.exists("/workspace/gate"):
    time.sleep(0.05)
for i in range(1, 31):
    print(f"line {i}")
"""


@docker
async def test_queued_request_small_replay_buffer_and_expired_session():
    """Frames made while the page is away survive a tiny replay buffer (they were never sent); a request
    made while offline goes out after the resume; then the session expires and a fresh one starts."""
    async with (
        run_server(server_settings(replay_frames=8)) as srv,
        chromium() as browser,
        open_page(browser, srv) as page,
    ):
        sid = (await stats(page))["sessionId"]
        session = srv.state.manager.sessions[sid]
        run, rid = await run_then_drop(page, session, GAP, "start\n")

        # A request made while offline waits in the page and goes out after the resume.
        await set_code(page, "print('queued while offline')")
        await page.get_by_test_id("run").click()
        queued = await cell(page)
        await expect(page.locator(".notice-muted").last).to_contain_text("queued")

        await page.evaluate("() => { const c = window.groundloop.client; c.autoReconnect = true; c.open(); }")
        await wait_state(page, "open")
        assert await wait_cell_state(run, "ok") == "ok"
        assert await stream_text(run) == "start\n" + "".join(f"line {i}\n" for i in range(1, 31))
        assert await wait_cell_state(queued, "ok") == "ok"
        assert await stream_text(queued) == "queued while offline\n"
        s = await stats(page)
        assert s["gaps"] == 0 and s["duplicates"] == 0 and s["seqJumps"] == 0 and s["sessionId"] == sid

        # The server closes the session (as when it expires): a fresh one starts, and the page says so.
        await set_code(page, "x = 1")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        await srv.state.manager.close_session(session, "test: expired")
        await expect(page.locator(".notice-warn").last).to_contain_text("fresh session")
        await wait_state(page, "open")
        s = await stats(page)
        assert s["sessionId"] != sid and s["expired"] == 1
        await set_code(page, "print('x' in globals())")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        assert await stream_text(await cell(page)) == "False\n"
        assert page.js_errors == []


LOSSY = """import os, time
print("start", flush=True)
while not os.path.exists("/workspace/gate1"):
    time.sleep(0.05)
for i in range(1, 21):
    print(f"line {i}", flush=True)
while not os.path.exists("/workspace/gate2"):
    time.sleep(0.05)
print("end")
"""


@docker
async def test_frames_lost_in_the_network_are_reported_as_a_gap():
    """Frames the server sent but the page never got, evicted from a tiny replay buffer: the resume
    brings a ``gap`` frame, the page says so, and the rest of the run still lands in its cell."""
    lose = False
    lost: list[str] = []
    enough = asyncio.Event()
    routes = []

    def route(ws):
        """Forward the page's socket to the server; while ``lose``, swallow what the server sends."""
        server_side = ws.connect_to_server()
        routes.append(ws)

        def from_server(message):
            if lose and ws is routes[-1]:
                lost.append(message)
                if sum('"line ' in m for m in lost) == 20:
                    enough.set()
            else:
                ws.send(message)

        server_side.on_message(from_server)

    async def setup(page):
        await page.route_web_socket(re.compile(r".*/v1/ws.*"), route)

    async with (
        run_server(server_settings(replay_frames=4)) as srv,
        chromium() as browser,
        open_page(browser, srv, setup=setup) as page,
    ):
        sid = (await stats(page))["sessionId"]
        session = srv.state.manager.sessions[sid]
        await set_code(page, LOSSY)
        await page.get_by_test_id("run").click()
        run = await cell(page)
        await expect(run.locator(".out-stdout")).to_have_text("start\n")
        lose = True
        await asyncio.wait_for(session.sb.request("exec", {"command": "touch /workspace/gate1", "timeout_s": 30}), 60)
        await asyncio.wait_for(enough.wait(), 60)
        lose = False
        await routes[-1].close(code=4000, reason="test: network lost")  # the page sees its socket drop
        await expect(page.locator(".notice-warn")).to_contain_text("frames were lost")
        await wait_state(page, "open")
        await asyncio.wait_for(session.sb.request("exec", {"command": "touch /workspace/gate2", "timeout_s": 30}), 60)
        assert await wait_cell_state(run, "ok") == "ok"
        text = await stream_text(run)
        assert text.startswith("start\n") and text.endswith("line 20\nend\n") and "line 1\n" not in text
        s = await stats(page)
        assert s["gaps"] == 1 and s["duplicates"] == 0 and s["seqJumps"] == 0 and s["sessionId"] == sid
        assert page.js_errors == []


EVIL = '''class Evil:
    def _repr_html_(self):
        return """<p id="shown">rendered, scripts off</p>
<script>
  document.title = "script ran in the frame";
  try { parent.document.title = "pwned"; } catch (e) {}
  try { parent.document.body.setAttribute("data-pwned", "1"); } catch (e) {}
  try { top.location = "about:blank"; } catch (e) {}
</script>
<img src="data:," onerror="parent.document.title = 'pwned by onerror'">
<form action="/v1/ws"><button id="b">x</button></form>"""

Evil()
'''


@docker
async def test_html_result_cannot_reach_the_page(server):
    async with chromium() as browser, open_page(browser, server) as page:
        title = await page.title()
        await set_code(page, EVIL)
        await page.get_by_test_id("run").click()
        run = await cell(page)
        assert await wait_cell_state(run, "ok") == "ok"
        frame_el = run.locator("iframe.result-frame")
        assert await frame_el.get_attribute("sandbox") == ""  # no allow-scripts, no allow-same-origin
        inner = page.frame_locator("iframe.result-frame")
        await expect(inner.locator("#shown")).to_have_text("rendered, scripts off")
        frame = await (await frame_el.element_handle()).content_frame()
        # The frame's scripts never ran, and its origin is opaque.
        assert await frame.evaluate("() => document.title") == ""
        assert await frame.evaluate("() => window.origin") == "null"
        assert (
            await frame.evaluate("() => { try { return !!parent.document; } catch (e) { return 'denied'; } }")
            == "denied"
        )
        # The page is untouched and still works.
        assert await page.title() == title
        assert await page.evaluate("() => document.body.hasAttribute('data-pwned')") is False
        assert page.url.startswith(server.http)
        await set_code(page, "print('still fine')")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        assert page.js_errors == []


@docker
async def test_assist_streams_tokens_and_interleaves_code_output():
    import anthropic
    from groundloop.server.metrics import Metrics
    from groundloop.sessions.assist import AssistRunner
    from support.fake_anthropic import FakeAnthropic, Gate, text

    gate = asyncio.Event()
    async with FakeAnthropic() as fake:
        fake.add(
            text("Let me check.\n", "```python\n", "values = [3, 4]\n", "print('mean', sum(values) / 0)\n", "```\n"),
            text(
                "Oops, a division by zero. Fixed:\n```python\nvalues = [3, 4]\n",
                "print('mean', sum(values) / len(values))\n```\n",
                Gate(gate),
                "The mean is **3.5**.",
            ),
        )
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
        settings = server_settings(model="claude-test")
        runner = AssistRunner(settings, Metrics(), client=client)
        async with (
            _closing(client),
            run_server(settings, assist=runner) as srv,
            chromium() as browser,
            open_page(browser, srv) as page,
        ):
            await page.get_by_test_id("prompt").fill("What is the mean of 3 and 4?")
            await page.get_by_test_id("assist").click()
            ask = await cell(page)
            panels = ask.locator(".exec-panel")
            # Second try: its output is shown while the model's reply is held mid-stream.
            await expect(panels.nth(1).locator(".out-stdout")).to_have_text("mean 3.5\n", timeout=TIMEOUT_MS)
            assert await ask.get_attribute("data-state") == "running"
            await expect(panels.nth(0).locator(".error-title")).to_contain_text("ZeroDivisionError")
            await expect(panels.nth(0)).to_have_attribute("data-state", "error")
            await expect(ask.locator(".iteration")).to_contain_text("Attempt 2")
            gate.set()
            assert await wait_cell_state(ask, "ok") == "ok"
            await expect(panels.nth(1)).to_have_attribute("data-state", "ok")
            # Order on screen: text, code, its output, the rest of the text.
            order = await ask.evaluate("""el => [...el.querySelectorAll('.model-text, .exec-panel, .iteration')]
                .filter(n => n.textContent.trim()).map(n => n.classList[n.classList.length - 1] + ':' + n.textContent.trim().slice(0, 30))""")
            kinds = [o.split(":")[0] for o in order]
            assert kinds == ["model-text", "exec-panel", "iteration", "model-text", "exec-panel", "model-text"], order
            assert order[-1] == "model-text:The mean is 3.5."
            await expect(ask.locator(".md-fence").first).to_contain_text("values = [3, 4]")
            await expect(ask.locator(".model-text strong")).to_have_text("3.5")
            await screenshot(page, "page-after-assist.png")
            assert page.js_errors == []


@docker
async def test_narrow_screen_keyboard_and_tokens(server):
    phone = {"width": 390, "height": 844}
    async with chromium() as browser:
        # A wrong token is refused, and the page says so.
        async with open_page(browser, server, token="nope", viewport=phone, wait_open=False) as page:
            await wait_state(page, "unauthorized")
        async with open_page(browser, server, viewport=phone) as page:
            # remembered in the browser
            assert await page.evaluate("() => localStorage.getItem('groundloop.token')") == "tok1"
            overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0
            for tid in ("editor", "run", "cancel", "output", "status", "prompt", "assist", "exec", "files", "token"):
                await expect(page.get_by_test_id(tid)).to_be_visible()
            unnamed = await page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
                .filter(e => e.getClientRects().length || e.closest('.CodeMirror'))
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                             && !e.textContent.trim() && !e.title)
                .map(e => e.outerHTML.slice(0, 80))""")
            assert unnamed == []
            # A real editor: type, then Ctrl+Enter runs.
            await page.locator(".CodeMirror").click()
            await page.keyboard.press("Control+A")
            await page.keyboard.type('print("typed in the editor")')
            await page.keyboard.press("Control+Enter")
            run = await cell(page)
            assert await wait_cell_state(run, "ok") == "ok"
            assert await stream_text(run) == "typed in the editor\n"
            # Esc leaves the editor; Tab moves on through the controls.
            await page.locator(".CodeMirror").click()
            await page.keyboard.press("Escape")
            assert await page.evaluate("() => document.activeElement.dataset.testid") == "run"
            await screenshot(page, "page-narrow.png")
            assert page.js_errors == []
        # A fresh page on the same browser profile would reuse the token; a new context has none.
        async with open_page(browser, server, token=None, wait_open=False) as page:
            await wait_state(page, "unauthorized")


async def test_rendering_helpers_in_the_browser():
    """render.js on its own (static/ over plain HTTP, no groundloop server): fences while streaming, safe
    text, bundles. Modules do not load from file://, so a stdlib HTTP server on loopback serves the folder."""
    async with chromium() as browser, static_http() as base:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(base + "/")  # the page itself (its socket finds no groundloop server there: it retries)
        r = await page.evaluate("""async () => {
            const R = await import("/render.js");
            const text = "Intro `x`\\n```python\\nprint(1)\\n```\\nafter <b>not bold</b>\\n~~~\\nopen";
            const parts = R.parseFences(text).map(p => [p.kind, p.lang || "", p.code || p.text, !!p.closed]);
            const cut = R.endOfLastFence(text);
            const md = R.renderMarkdown(document.createElement("div"), text);
            const plain = R.renderBundle({"text/plain": "<img src=x onerror=alert(1)>"}, true);
            const html = R.renderBundle({"text/html": "<b>hi</b>", "text/plain": "hi"}, true);
            const json = R.renderBundle({"application/json": {"a": [1]}}, false);
            const svg = R.renderBundle({"image/svg+xml": "<svg xmlns='http://www.w3.org/2000/svg'/>"}, false);
            return {parts, rest: text.slice(cut), mdImgs: md.querySelectorAll("img, b").length,
                    mdCode: md.querySelector("pre.md-fence").textContent, mdInline: md.querySelector("code.md-code").textContent,
                    plainText: plain.querySelector("pre").textContent, plainImgs: plain.querySelectorAll("img").length,
                    frameSandbox: html.querySelector("iframe").getAttribute("sandbox"),
                    frameDoc: html.querySelector("iframe").srcdoc,
                    json: json.querySelector("pre").textContent, jsonMime: json.dataset.mime,
                    svgSrc: svg.querySelector("img").getAttribute("src").slice(0, 24)};
        }""")
        assert r["parts"] == [
            ["prose", "", "Intro `x`\n", False],
            ["code", "python", "print(1)\n", True],
            ["prose", "", "after <b>not bold</b>\n", False],
            ["code", "", "open", False],
        ]
        assert r["rest"] == "after <b>not bold</b>\n~~~\nopen"
        assert r["mdImgs"] == 0 and r["mdCode"] == "print(1)" and r["mdInline"] == "x"
        assert r["plainText"] == "<img src=x onerror=alert(1)>" and r["plainImgs"] == 0
        assert r["frameSandbox"] == "" and "default-src 'none'" in r["frameDoc"] and "<b>hi</b>" in r["frameDoc"]
        assert r["json"] == '{\n  "a": [\n    1\n  ]\n}' and r["jsonMime"] == "application/json"
        assert r["svgSrc"] == "data:image/svg+xml;chars"
        assert errors == []


@docker
async def test_a_drained_server_hands_the_page_a_fresh_session(server):
    """Issue 20: the page shows the drain, lets its running cell finish, then opens a fresh session at once
    (the fleet's proxy sends it to another server): no resume attempt, not counted as an expired session."""
    from groundloop.server.drain import drain

    async with chromium() as browser, open_page(browser, server) as page:
        sid = (await stats(page))["sessionId"]
        await set_code(page, "x = 1\nimport time\nfor i in range(10):\n    print(i, flush=True)\n    time.sleep(0.2)")
        await page.get_by_test_id("run").click()
        run = await cell(page)
        await expect(run.locator("pre.stream")).to_contain_text("0")
        drained = asyncio.create_task(drain(server.state, 30))
        await expect(page.locator(".notice-warn").last).to_contain_text("restarting")
        assert await wait_cell_state(run, "ok") == "ok"
        assert await stream_text(run) == "".join(f"{i}\n" for i in range(10))
        assert await drained == 1
        server.state.manager.draining = False  # another server of the fleet: here the same one, back in rotation
        await expect(page.locator(".notice-warn").last).to_contain_text("fresh session on another server")
        await wait_state(page, "open")
        s = await stats(page)
        assert s["sessionId"] != sid and s["drained"] == 1 and s["expired"] == 0 and s["resumes"] == 0, s
        await set_code(page, "print('x' in globals())")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        assert await stream_text(await cell(page)) == "False\n"
        assert page.js_errors == []
