"""Helpers for the browser tests: Debian's Chromium driven by playwright, and page probes.

``chromium()`` launches the system Chromium (``/usr/bin/chromium``, or
``GROUNDLOOP_CHROMIUM``) headless with the flags CI needs; ``open_page``
loads the groundloop page of a running test server and waits for its
connection to be ``open`` (the server's ``ready`` frame has arrived).

The page exposes ``window.groundloop`` (see static/app.js); the helpers here
use it only to read state and to set the editor's text, everything else goes
through the page's own controls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("GROUNDLOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Generous: two cores shared with other test runs, containers starting.
TIMEOUT_MS = 60_000


def chromium_missing() -> str | None:
    """None when the browser tests can run, else why not."""
    if not Path(CHROMIUM).exists():
        return f"Chromium is not installed at {CHROMIUM}"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def open_page(
    browser: Any,
    srv: Any,
    *,
    token: str | None = "tok1",
    viewport: dict | None = None,
    wait_open: bool = True,
    setup: Any = None,
) -> AsyncIterator[Any]:
    """A fresh browser context on ``srv``'s page; with ``token``, typed into the token field.

    ``setup(page)`` is awaited after the page loaded and before the token is entered (the first,
    anonymous attempt of a page on a server with tokens is refused and creates no session)."""
    context = await browser.new_context(viewport=viewport or {"width": 1360, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # checked by the tests: the page must not throw
    try:
        await page.goto(srv.http + "/")
        if setup is not None:
            await setup(page)
        if token is not None:
            await page.get_by_test_id("token").fill(token)
            await page.get_by_test_id("connect").click()
        if wait_open:
            await wait_state(page, "open")
        yield page
    finally:
        await context.close()


async def wait_state(page: Any, state: str) -> None:
    await page.locator(f'[data-testid="status"][data-state="{state}"]').wait_for()


async def set_code(page: Any, code: str, language: str = "python") -> None:
    await page.evaluate("([code, lang]) => window.groundloop.setCode(code, lang)", [code, language])


async def stats(page: Any) -> dict[str, Any]:
    return await page.evaluate("() => window.groundloop.stats()")


async def cell(page: Any) -> Any:
    """The newest request cell of the output pane, pinned by its request id."""
    rid = await page.locator('[data-testid="output"] article.cell').last.get_attribute("data-request-id")
    return page.locator(f'[data-testid="output"] article.cell[data-request-id="{rid}"]')


async def wait_cell_state(c: Any, *states: str) -> str:
    """Wait until the cell's ``data-state`` is one of ``states``; return it."""
    import re

    from playwright.async_api import expect

    await expect(c).to_have_attribute("data-state", re.compile("^(" + "|".join(states) + ")$"), timeout=TIMEOUT_MS)
    return await c.get_attribute("data-state")


async def stream_text(c: Any, stream: str = "stdout") -> str:
    """The text a cell shows for one stream, in order."""
    return await c.evaluate(
        "(el, s) => [...el.querySelectorAll(`.cell-body > pre.stream > .out-${s}`)].map(n => n.textContent).join('')",
        stream,
    )


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=False)
    return path
