"""The page shows notebook results (real Chromium, real server, the standard sandbox image): a matplotlib
figure as a PNG, a DataFrame as a table in the sandboxed frame, Markdown and LaTeX as text."""

from __future__ import annotations

import pytest
from support.browser import TIMEOUT_MS, cell, chromium, chromium_missing, open_page, set_code, wait_cell_state

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
]

CELL = """import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, Latex
plt.figure(figsize=(3, 2), dpi=100)
plt.plot([1, 3, 2])
plt.show()
display(Markdown("**bold**, *slanted*, 2 * 3 * 4 and <img src=x onerror=alert(1)>"))
display(Latex(r"$\\sum_i x_i$"))
pd.DataFrame({"city": ["Lyon", "Oslo"], "temp": [21, 9]})
"""


def expect(locator):
    from playwright.async_api import expect as pw_expect

    pw_expect.set_options(timeout=TIMEOUT_MS)
    return pw_expect(locator)


async def test_a_figure_a_dataframe_markdown_and_latex(server):
    async with chromium() as browser, open_page(browser, server) as page:
        await set_code(page, CELL)
        await page.get_by_test_id("run").click()
        run = await cell(page)
        assert await wait_cell_state(run, "ok", "error") == "ok"
        mimes = await run.locator(".result").evaluate_all("nodes => nodes.map(n => n.dataset.mime)")
        assert mimes == ["image/png", "text/markdown", "text/latex", "text/html"]

        img = run.locator("img.result-img")
        await expect(img).to_have_count(1)
        src = await img.get_attribute("src")
        assert src.startswith("data:image/png;base64,iVBOR")
        # A real, decoded picture (300 x 200 at most: the inline backend trims the figure's margins).
        await page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=await img.element_handle())

        md = run.locator(".result-md")
        await expect(md.locator("strong")).to_have_text("bold")
        await expect(md.locator("em")).to_have_text("slanted")  # one: `2 * 3 * 4` is no emphasis
        assert await md.locator("img").count() == 0  # HTML in Markdown stays text
        await expect(run.locator(".result-latex")).to_have_text("$\\sum_i x_i$")

        frame = run.locator("iframe.result-frame")
        assert await frame.get_attribute("sandbox") == ""
        table = page.frame_locator("iframe.result-frame").locator("table")
        await expect(table.locator("th").filter(has_text="city")).to_have_count(1)
        await expect(table.locator("td").filter(has_text="Oslo")).to_have_count(1)
        assert page.js_errors == []


async def test_a_display_updated_from_a_later_cell_and_clear_output(server):
    """An update replaces the display where it is shown, also in an earlier cell; clear_output empties the cell's
    output (with wait=True: when the next output comes, so the cell never shows empty in between)."""
    async with chromium() as browser, open_page(browser, server) as page:
        await set_code(page, "print('before')\ndisplay('step 1', display_id='progress')\n'value'")
        await page.get_by_test_id("run").click()
        first = await cell(page)
        assert await wait_cell_state(first, "ok", "error") == "ok"
        shown = first.locator('.result[data-display-id="progress"]')
        await expect(shown).to_contain_text("'step 1'")

        await set_code(
            page,
            "from IPython.display import update_display, clear_output\n"
            "update_display('step 2', display_id='progress')\n"
            "print('gone')\n"
            "clear_output()\n"
            "print('shown')\n"
            "clear_output(wait=True)\n"
            "print('last')\n",
        )
        await page.get_by_test_id("run").click()
        second = await cell(page)
        assert await wait_cell_state(second, "ok", "error") == "ok"
        await expect(shown).to_contain_text("'step 2'")  # replaced in the first cell, in place
        assert await first.locator(".result").count() == 2  # the display and the value: no new result
        await expect(first.locator(".stream")).to_have_text("before\n")
        await expect(second.locator(".stream")).to_have_text("last\n")  # 'gone' and 'shown' cleared
        assert await second.locator(".result").count() == 0  # an update of another cell's display adds nothing
        assert page.js_errors == []
