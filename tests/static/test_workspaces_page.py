"""The page with a named workspace (``/?workspace=<name>``) in real Chromium: its files outlive the page's
session, and a resume goes back to the same session (the page's WebSocket URL has a query already)."""

from __future__ import annotations

import asyncio

import pytest
from support.browser import TIMEOUT_MS, cell, chromium, chromium_missing, stats, wait_cell_state, wait_state
from support.env import sandbox_settings, server_settings
from support.servers import run_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
]


async def open_workspace_page(browser, server, name):
    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    await page.goto(f"{server.http}/?workspace={name}")
    await page.get_by_test_id("token").fill("tok1")
    await page.get_by_test_id("connect").click()
    await wait_state(page, "open")
    return context, page


async def test_the_page_opens_a_named_workspace_and_resumes_into_it(tmp_path):
    from playwright.async_api import expect

    sb = sandbox_settings(pool_size=0, workspace_dir=str(tmp_path), workspace_quota="64m")
    async with run_server(server_settings(sandbox=sb, resume_grace_s=0.5)) as server, chromium() as browser:
        context, page = await open_workspace_page(browser, server, "proj")
        try:
            await expect(page.get_by_test_id("sandbox")).to_contain_text("workspace proj")
            await page.get_by_test_id("command").fill("echo kept > kept.txt")
            await page.get_by_test_id("exec").click()
            assert await wait_cell_state(await cell(page), "ok") == "ok"
            await expect(page.get_by_test_id("files").locator('[data-name="kept.txt"]')).to_be_visible()

            # a drop resumes the same session: the resume URL keeps the page's query and adds its own
            sid = (await stats(page))["sessionId"]
            await page.evaluate("() => window.groundloop.dropConnection()")
            await page.wait_for_function("() => window.groundloop.stats().resumes === 1")
            await wait_state(page, "open")
            assert (await stats(page))["sessionId"] == sid
            assert page.js_errors == []
        finally:
            await context.close()
        while server.state.manager.sessions:  # the page's session ends after its resume grace
            await asyncio.sleep(0.05)

        # a new page, a new session: the file is there
        context, page = await open_workspace_page(browser, server, "proj")
        try:
            assert (await stats(page))["sessionId"] != sid
            await expect(page.get_by_test_id("files").locator('[data-name="kept.txt"]')).to_be_visible()
            assert page.js_errors == []
        finally:
            await context.close()
