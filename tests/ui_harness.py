"""The browser side of the UI tests, shared by every tests/test_ui_*.py module that drives
headless Chromium: the browser (one per module), Tabs (pages with their script errors recorded
and screenshots kept in test-output/ui/<test>-<step>.png), and small readers of the server.

Needs the playwright package and Debian's Chromium at /usr/bin/chromium (never a browser that
Playwright downloads); without either, a module importing this is skipped. The fixtures
`browser` and `tabs` (conftest.py) are built from it; a module using them sets
`pytestmark = pytest.mark.asyncio(loop_scope="module")`, the browser's loop.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from helpers import ROOT

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.async_api", reason="the playwright package is not installed (pip install playwright)")

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = ROOT / "test-output" / "ui"
# CI is a slow two-core machine: every wait on the page is generous, and none is a sleep.
expect.set_options(timeout=15000)
MODEL_START_MS = 30000



# Harness ###################################################################################

@contextlib.asynccontextmanager
async def launched_browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Tabs:
    """The browser pages of one test: each in its own context, uncaught script errors recorded,
    screenshots named after the test and the step."""

    def __init__(self, browser: Browser, test_name: str):
        self.browser = browser
        self.test_name = re.sub(r"[^\w.-]+", "_", test_name)
        self.contexts = []
        self.errors: list[str] = []

    async def open(self, ls, path: str = "/ui/", **context_options) -> Page:
        context = await self.browser.new_context(**context_options)
        self.contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        await page.goto(ls.url + path)
        return page

    async def shot(self, page: Page, step: str, full_page: bool = False) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.test_name}-{step}.png"
        await page.screenshot(path=str(path), full_page=full_page)
        return path

    async def close(self) -> None:
        for context in self.contexts:
            for page in context.pages:
                try:  # the state each page ended in, passed or not
                    await self.shot(page, f"end-{self.contexts.index(context)}")
                except Exception:
                    pass
            await context.close()


def fixed_port_model(upstreams, port: int, *args: str, name: str) -> dict:
    """A model on a port chosen here, so the test can ask its responder what it saw."""
    return {"cmd": upstreams.cmd(*args, name=name).replace("${PORT}", str(port)), "proxy": f"http://127.0.0.1:{port}"}


async def responder_events(session: aiohttp.ClientSession, port: int) -> list[dict]:
    async with session.get(f"http://127.0.0.1:{port}/_responder/events") as r:
        return await r.json()


async def model_states(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    async with session.get(ls.url + "/running") as r:
        return {entry["model"]: entry["state"] for entry in (await r.json())["running"]}


async def activity_rows(session: aiohttp.ClientSession, ls) -> list[dict]:
    async with session.get(ls.url + "/api/metrics/activity") as r:
        return (await r.json())["data"]
