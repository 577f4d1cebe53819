"""The terminal pane (static/terminal.js, xterm.js) in real headless Chromium, real server, real Docker, runc and runsc.

The page's own controls and the keyboard drive the terminal; what is checked
is what xterm.js shows (its buffer, read through ``window.groundloop.terminal``):
echo, Ctrl-C, the size a program sees after the pane is resized, a full-screen
program on the alternate screen, and the output of a resumed page drawn once.
"""

from __future__ import annotations

import pytest
import pytest_asyncio
from support.browser import chromium, chromium_missing, open_page, screenshot, stats, wait_state
from support.env import sandbox_settings, server_settings
from support.servers import run_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
# Exits 0 once a process runs exactly `sleep 100` (the shell's fork has become sleep: after its tcsetpgrp).
SLEEPING = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -q '^sleep 100 $'"

CURSES = """import curses

def main(scr):
    scr.clear()
    scr.addstr(5, 10, "groundloop-curses")
    scr.addstr(6, 10, "size %dx%d" % (curses.COLS, curses.LINES))
    scr.refresh()
    scr.getch()

curses.wrapper(main)
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, start_timeout_s=60.0)
    async with run_server(server_settings(sandbox=sb, resume_grace_s=30.0)) as s:
        yield s


async def lines_matching(page, pattern: str) -> int:
    """How many lines of the terminal's buffer match the regular expression ``pattern`` (whole line)."""
    return await page.evaluate(
        "(p) => window.groundloop.terminal.text().split('\\n').filter((l) => new RegExp(`^${p}$`).test(l)).length",
        pattern,
    )


async def wait_line(page, pattern: str, count: int = 1) -> None:
    await page.wait_for_function(
        "([p, k]) => window.groundloop.terminal.text().split('\\n').filter((l) => new RegExp(`^${p}$`).test(l)).length"
        " >= k",
        arg=[pattern, count],
    )


async def type_line(page, text: str) -> None:
    await page.keyboard.type(text)
    await page.keyboard.press("Enter")


async def start_terminal(page) -> None:
    await page.get_by_test_id("terminal").click()  # a click on a closed terminal starts it, and focuses it
    await page.locator('[data-testid="terminal"][data-state="open"]').wait_for()
    await page.get_by_test_id("terminal").click()


async def test_type_interrupt_and_resize(srv):
    async with chromium() as browser, open_page(browser, srv) as page:
        await start_terminal(page)
        await type_line(page, "echo hi-$((40 + 2))")
        await wait_line(page, "hi-42")

        await type_line(page, "echo started; sleep 100")
        await wait_line(page, "started")
        # A Ctrl-C before sleep is the foreground job would reach the shell instead (a user sees sleep run first).
        await page.wait_for_function(
            "async (cmd) => (await window.groundloop.client.request('exec', {command: cmd}).done).exit_code === 0",
            arg=SLEEPING,
            polling=200,
        )
        await page.keyboard.press("Control+c")
        await type_line(page, "echo code=$?")
        await wait_line(page, "code=130")

        # The pane follows the window (columns) and its own box (rows); the shell sees both.
        before = await page.evaluate("() => window.groundloop.terminal.screen()")
        await page.set_viewport_size({"width": 1000, "height": 860})
        await page.evaluate("() => { document.getElementById('terminal').style.height = '400px'; }")
        await page.wait_for_function(
            "([c, r]) => { const s = window.groundloop.terminal.screen(); return s.cols < c && s.rows > r; }",
            arg=[before["cols"], before["rows"]],
        )
        after = await page.evaluate("() => window.groundloop.terminal.screen()")
        await type_line(page, "stty size")
        await wait_line(page, f"{after['rows']} {after['cols']}")
        await screenshot(page, "page-terminal.png")

        await page.get_by_test_id("terminal-toggle").click()  # Close
        await page.locator('[data-testid="terminal"][data-state="closed"]').wait_for()
        assert "ended" in await page.get_by_test_id("terminal-state").text_content()
        assert page.js_errors == []


async def test_full_screen_program_and_resume(srv):
    async with chromium() as browser, open_page(browser, srv) as page:
        done = await page.evaluate(
            "(c) => window.groundloop.client.request('write_file', {path: 'screen.py', content: c}).done", CURSES
        )
        assert done["ok"], done
        await start_terminal(page)
        await type_line(page, "python3 screen.py")
        await page.wait_for_function(
            "() => { const s = window.groundloop.terminal.screen();"
            " return s.type === 'alternate' && s.text.split('\\n')[5].indexOf('groundloop-curses') === 10; }"
        )
        s = await page.evaluate("() => window.groundloop.terminal.screen()")
        assert s["text"].split("\n")[6][10:].startswith(f"size {s['cols']}x{s['rows']}"), s
        await page.keyboard.press("q")
        await page.wait_for_function("() => window.groundloop.terminal.screen().type === 'normal'")
        await type_line(page, "echo back-$((1 + 1))")
        await wait_line(page, "back-2")

        # A dropped connection: the page resumes; what came before is drawn once, what came while away after it.
        await type_line(page, "echo once-$((3 * 3))")
        await wait_line(page, "once-9")
        await type_line(page, "sleep 1; echo away-$((4 * 4))")
        await page.evaluate("() => window.groundloop.dropConnection()")
        await page.wait_for_function("() => window.groundloop.stats().resumes === 1")
        await wait_state(page, "open")
        await wait_line(page, "away-16")
        await type_line(page, "echo after-$((5 * 5))")  # the terminal still takes keystrokes
        await wait_line(page, "after-25")
        assert await lines_matching(page, "once-9") == 1
        assert await lines_matching(page, "away-16") == 1
        assert await lines_matching(page, "back-2") == 1
        assert (await stats(page))["duplicates"] == 0
        assert page.js_errors == []
