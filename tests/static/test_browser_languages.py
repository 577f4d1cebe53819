"""The page offers the languages of issue 16 (TypeScript, Bash), only those its sandbox runs, and runs them:
real headless Chromium, a real server, real Docker."""

from __future__ import annotations

import pytest
from support.browser import cell, chromium, chromium_missing, open_page, set_code, stream_text, wait_cell_state

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
]


async def test_the_page_runs_bash_and_typescript(server):
    async with chromium() as browser, open_page(browser, server) as page:
        options = page.get_by_test_id("language").locator("option")
        values = await options.evaluate_all("os => os.map(o => [o.value, o.disabled])")
        offered = {value for value, disabled in values if not disabled}
        assert {"python", "javascript", "bash"} <= offered

        await set_code(page, "cd /tmp\nexport STAGE=warm", "bash")
        await page.get_by_test_id("run").click()
        assert await wait_cell_state(await cell(page), "ok") == "ok"
        await set_code(page, 'echo "$(pwd) $STAGE"', "bash")
        await page.get_by_test_id("run").click()
        shell = await cell(page)
        assert await wait_cell_state(shell, "ok") == "ok"
        assert await stream_text(shell) == "/tmp warm\n"

        if "typescript" not in offered:
            pytest.skip("this sandbox image has no TypeScript (the minimal profile)")
        await set_code(page, "const n: number = await Promise.resolve(6);\nconsole.log(`n is ${n * 7}`)", "typescript")
        await page.get_by_test_id("run").click()
        ts = await cell(page)
        assert await wait_cell_state(ts, "ok") == "ok"
        assert await stream_text(ts) == "n is 42\n"
        assert page.js_errors == []
