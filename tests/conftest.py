"""Fixtures of the shared harness (the helpers they use live in helpers.py).

`upstreams` builds responder commands for a test's configs and proves at teardown that none of
their processes is left running; `start_llama_swap` starts llama-swap processes and stops them;
`in_process` runs llama-swap in the test's own event loop instead, for tests of handlers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

# Before helpers is imported: its asserts (running, assert_envelope, LoopProber) get pytest's
# detailed failure messages, as they did when they lived in this file.
pytest.register_assert_rewrite("helpers")

import helpers  # noqa: E402
from helpers import InProcess, Upstreams, eventually, wait_until  # noqa: E402


@pytest.fixture
def upstreams(tmp_path: Path) -> Upstreams:
    ups = Upstreams(tmp_path)
    yield ups
    leftovers = ups.kill_leftovers()
    assert not leftovers, f"upstream processes left running after the test: {leftovers}"


@pytest.fixture
def start_llama_swap(tmp_path: Path, upstreams: Upstreams):
    """start_llama_swap(config) -> a running LlamaSwap; it is stopped (SIGTERM) at teardown."""
    servers: list[helpers.LlamaSwap] = []

    def start(config: dict | str, *extra_args: str) -> helpers.LlamaSwap:
        # Looked up when called, so a test may put a subclass in its place (monkeypatch helpers.LlamaSwap).
        server = helpers.LlamaSwap(tmp_path, config, extra_args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        try:
            server.stop()
        except subprocess.TimeoutExpired:
            server.kill()
            raise AssertionError(f"llama-swap did not shut down on SIGTERM:\n{server.output()}")
    # Upstreams must already be gone once llama-swap has exited: shutdown stops them all.
    assert wait_until(lambda: not upstreams.alive(), 5), f"upstreams alive after llama-swap exited: {upstreams.alive()}"


@pytest.fixture
async def in_process(tmp_path: Path, upstreams: Upstreams):
    """await in_process(config) -> a started InProcess; it is shut down as serve() would at teardown."""
    proxies: list[InProcess] = []

    async def start(config: dict | str) -> InProcess:
        proxy = InProcess(tmp_path, config)
        proxies.append(proxy)
        return await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.stop()
    assert await eventually(lambda: not upstreams.alive(), 5), f"upstreams alive after shutdown: {upstreams.alive()}"


# The web UI's browser tests (tests/test_ui_*.py): imported when first used, so that a machine
# without Chromium or playwright skips those modules (tests/ui_harness.py) and nothing else.

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    """Headless Chromium, one per module."""
    import ui_harness
    async with ui_harness.launched_browser() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="module")
async def tabs(browser, start_llama_swap, request):
    """The test's browser pages; no page may end with an uncaught script error. Depends on
    start_llama_swap so that the pages close before the server stops."""
    import ui_harness
    tabs = ui_harness.Tabs(browser, request.node.name)
    try:
        yield tabs
    finally:
        await tabs.close()
    assert not tabs.errors, f"uncaught errors in the page: {tabs.errors}"
