"""The page's live files (static/files.js) in real headless Chromium, under runc and runsc.

A server per runtime with a frame limit of 128 KiB, so that the files moved
here take several chunks each way. Checked as a user sees it: a file written
by a program appears in the list with no reload and no request of the page's
own; a file dropped on the files panel is uploaded (with its progress row)
and the sandbox reads the same bytes; the ⤓ of a row downloads the file, and
the bytes Chromium saved are the sandbox's.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_asyncio
from support.browser import TIMEOUT_MS, chromium, chromium_missing, open_page
from support.env import sandbox_settings, server_settings
from support.servers import run_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
]
RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
FRAME_MAX = 128 << 10


def expect(locator):
    from playwright.async_api import expect as pw_expect

    pw_expect.set_options(timeout=TIMEOUT_MS)
    return pw_expect(locator)


def pattern(n: int) -> bytes:
    """The bytes the page builds for its dropped file (the same formula in JavaScript below)."""
    return bytes((i * 31 + (i >> 8) * 7) % 256 for i in range(n))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, max_file_bytes=4 << 20)
    settings = server_settings(sandbox=sb, max_message_bytes=FRAME_MAX, resume_grace_s=1.0)
    async with run_server(settings) as s:
        yield s


async def run_in_sandbox(page, code: str) -> str:
    """Run code through the page's client (not its controls: no cell, no refresh of the list); its stdout."""
    return await page.evaluate(
        """async (code) => {
            let out = "";
            const h = window.groundloop.client.request("run_code", { code },
                { onFrame: (f) => { if (f.type === "stdout") out += f.text; } });
            const d = await h.done;
            if (!d.ok) throw new Error(JSON.stringify(d.error));
            return out;
        }""",
        code,
    )


async def test_a_file_written_by_a_program_appears_and_goes_without_reload(srv):
    async with chromium() as browser, open_page(browser, srv) as page:
        files = page.get_by_test_id("files")
        await expect(page.locator(".files[data-live]")).to_be_visible()
        # Written a second after the request ended: only the watch can bring it to the list.
        await run_in_sandbox(
            page, "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 1; echo hi > late.txt; mkdir later'])"
        )
        await expect(files.locator('button.file[data-name="late.txt"]')).to_be_visible()
        await expect(files.locator('button.file-directory[data-name="later"]')).to_be_visible()
        await run_in_sandbox(page, "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 1; rm late.txt'])")
        await expect(files.locator('button.file[data-name="late.txt"]')).to_have_count(0)
        stats = await page.evaluate("() => window.groundloop.files.stats()")
        assert stats["events"] >= 3 and stats["watching"], stats
        assert page.js_errors == []


async def test_a_dropped_file_is_uploaded_in_chunks_and_readable_by_code(srv):
    size = 300_000  # three chunks of a 128 KiB frame
    async with chromium() as browser, open_page(browser, srv) as page:
        await expect(page.locator(".files[data-live]")).to_be_visible()
        await page.evaluate(
            """(size) => {
                const bytes = new Uint8Array(size);
                for (let i = 0; i < size; i++) bytes[i] = (i * 31 + (i >> 8) * 7) % 256;
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.bin", { type: "application/octet-stream" }));
                const zone = document.querySelector(".files");
                for (const type of ["dragenter", "dragover", "drop"]) {
                    zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
                }
            }""",
            size,
        )
        row = page.locator('.transfer-upload[data-name="dropped.bin"]')
        await expect(row).to_have_attribute("data-state", "ok")
        assert await row.locator("progress").evaluate("p => p.value === p.max")
        await expect(page.get_by_test_id("files").locator('button.file[data-name="dropped.bin"]')).to_be_visible()
        out = await run_in_sandbox(
            page, "import hashlib, os\nprint(hashlib.sha256(open('dropped.bin', 'rb').read()).hexdigest())"
        )
        assert out.strip() == hashlib.sha256(pattern(size)).hexdigest()
        assert page.js_errors == []


async def test_download_saves_the_sandboxs_bytes(srv):
    size = 333_333
    async with chromium() as browser, open_page(browser, srv) as page:
        await expect(page.locator(".files[data-live]")).to_be_visible()
        await run_in_sandbox(page, f"open('blob.bin', 'wb').write(bytes((i * 131 + 17) % 251 for i in range({size})))")
        want = bytes((i * 131 + 17) % 251 for i in range(size))
        button = page.locator('[data-testid="file-download"][data-download="blob.bin"]')
        await expect(button).to_be_visible()
        async with page.expect_download(timeout=TIMEOUT_MS) as info:
            await button.click()
        download = await info.value
        assert download.suggested_filename == "blob.bin"
        saved = await download.path()
        with open(saved, "rb") as f:
            assert f.read() == want
        await expect(page.locator('.transfer-download[data-name="blob.bin"]')).to_have_attribute("data-state", "ok")
        last = await page.evaluate(
            "() => { const d = window.groundloop.files.lastDownload(); return { size: d.size, sha256: d.sha256 }; }"
        )
        assert last == {"size": size, "sha256": hashlib.sha256(want).hexdigest()}
        assert page.js_errors == []
