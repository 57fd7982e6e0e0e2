"""The web UI's model page (/ui/model/<id>) end to end in headless Chromium: a real llama-swap
with responder upstreams, the page opened from the models page or by address, its Load, Wake and
Unload buttons, the model's live output, its swaps with their reasons, load and wake times, the
plan, its recent requests, its settings with secrets masked, an unknown ID, a phone and the
dark theme.

Needs the playwright package and Debian's Chromium at /usr/bin/chromium (see ui_harness.py).
Every screenshot lands in test-output/ui/<test>-<step>.png.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from ui_harness import MODEL_START_MS, Page, expect, model_states

pytestmark = pytest.mark.asyncio(loop_scope="module")

ONE_AT_A_TIME = "one model at a time (no groups configured)"


async def chat(session: aiohttp.ClientSession, ls, model: str) -> None:
    async with session.post(ls.url + "/v1/chat/completions",
                            json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def no_overflow(page: Page, width: int) -> None:
    """Nothing on the page scrolls sideways at this width."""
    scroll_width = await page.evaluate("document.scrollingElement.scrollWidth")
    assert scroll_width <= width, f"the page is {scroll_width}px wide at a {width}px viewport"


async def test_load_from_the_page_shows_its_output_then_a_swap_request_and_load_time(start_llama_swap, upstreams,
                                                                                      tabs):
    ls = start_llama_swap({"healthCheckTimeout": 60, "captureBuffer": 5, "models": {
        "a": {"cmd": upstreams.cmd("--startup-delay", "3", name="a"), "description": "a slow starter"},
        "b": {"cmd": upstreams.cmd(name="b")}}})
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("model-link-a").click()
    await expect(page).to_have_url(f"{ls.url}/ui/model/a")
    await expect(page.get_by_test_id("nav-models")).to_have_attribute("aria-current", "page")
    state, load, unload = (page.get_by_test_id("model-page-state"), page.get_by_test_id("model-page-load"),
                           page.get_by_test_id("model-page-unload"))
    log = page.get_by_test_id("model-page-log")
    await expect(page.get_by_test_id("model-page-title")).to_have_text("a")
    await expect(page.locator("main")).to_contain_text("a slow starter")
    await expect(state).to_have_text("stopped")
    await expect(load).to_be_enabled()
    await expect(unload).to_be_disabled()
    await expect(page.get_by_test_id("model-page-plan-action")).to_have_text("Start it, beside whatever runs.")
    await expect(page.get_by_test_id("model-page-usual-load")).to_have_text("not measured yet")
    await expect(page.get_by_test_id("model-page-swaps")).to_contain_text("No swaps involving this model yet.")
    await expect(page.get_by_test_id("model-page-activity")).to_be_empty()

    await load.click()
    # The responder prints "loading model..." for three seconds before it listens.
    await expect(state).to_have_text("starting")
    await expect(page.get_by_test_id("model-page-loading")).to_be_visible()
    await expect(load).to_be_disabled()
    await expect(log).to_contain_text("loading model...")
    await tabs.shot(page, "starting")
    await expect(state).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("model-page-loading")).to_be_hidden()
    await expect(log).to_contain_text("responder a listening on")
    await expect(unload).to_be_enabled()
    await expect(load).to_be_disabled()
    await expect(page.get_by_test_id("model-page-plan-action")).to_have_text("Serve it at once: the model is ready.")
    await expect(page.get_by_test_id("model-page-ttl")).to_contain_text("none (stays loaded)")
    swaps = page.get_by_test_id("model-page-swaps")
    await expect(swaps.locator("tbody tr")).to_have_count(1)
    await expect(swaps.locator("tbody tr").first).to_contain_text("started")
    await expect(swaps.locator("tbody tr").first).to_contain_text("the load API, from 127.0.0.1")
    await tabs.shot(page, "ready")

    async with aiohttp.ClientSession() as s:
        # A request: its row arrives without a reload, with the link to its capture.
        await chat(s, ls, "a")
        activity = page.get_by_test_id("model-page-activity")
        rows = activity.locator("tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("/v1/chat/completions")
        await expect(rows.first).to_contain_text("200")
        await expect(rows.first.locator("td[data-label='In']")).to_have_text("7")
        await expect(rows.first.locator("td[data-label='Out']")).to_have_text("3")
        await expect(log).to_contain_text("request POST /v1/chat/completions")

        # Another model takes its place: the page says why, and what its load took.
        await chat(s, ls, "b")
        await expect(state).to_have_text("stopped")
        await expect(page.get_by_test_id("model-page-reason")).to_have_text("Stopped: swapped out to make room")
        stopped = swaps.locator("tbody tr").first  # newest first
        await expect(swaps.locator("tbody tr")).to_have_count(2)
        await expect(stopped.locator("td[data-label='What']")).to_have_text("stopped")
        await expect(stopped.locator("td[data-label='Why']")).to_have_text(f"{ONE_AT_A_TIME} · for b")
        await expect(stopped.locator("td[data-label='Caused by']")).to_have_text(
            "POST /v1/chat/completions from 127.0.0.1")
        await expect(stopped.locator("td[data-label='Result']")).to_have_text("ok")
        await expect(page.get_by_test_id("model-page-usual-load")).to_have_text(
            re.compile(r"^(\d+ ms|\d+\.\d s) \(the median of 1\)$"))
        await expect(page.get_by_test_id("model-page-load-times").locator(".tag")).to_have_count(1)
        plan = page.get_by_test_id("model-page-plan")
        await expect(page.get_by_test_id("model-page-plan-action")).to_have_text("Swap: start it, after making room:")
        await expect(plan).to_contain_text(f"stops b because {ONE_AT_A_TIME}")
        await expect(plan).to_contain_text(re.compile(r"Expected wait: about \d+\.\d s\."))
        await expect(load).to_be_enabled()
        await expect(unload).to_be_disabled()
        await tabs.shot(page, "swapped-out", full_page=True)

        # The capture of its request opens from its row.
        [capture] = await activity.locator("a[data-testid^='model-page-capture-']").all()
        await capture.click()
        await expect(page).to_have_url(re.compile(r"/ui/captures/\d+$"))
        await expect(page.get_by_test_id("capture-request")).to_contain_text("/v1/chat/completions")
        assert await model_states(s, ls) == {"b": "ready"}


async def test_a_failed_start_shows_its_reason_and_unload_stops_a_running_model(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {
        "broken": {"cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.3", name="broken")},
        "fine": {"cmd": upstreams.cmd(name="fine"), "ttl": 600}}})
    page = await tabs.open(ls, "/ui/model/broken")
    await expect(page.get_by_test_id("model-page-state")).to_have_text("stopped")
    await page.get_by_test_id("model-page-load").click()
    await expect(page.get_by_test_id("model-page-state")).to_have_text("failed", timeout=MODEL_START_MS)
    failure = page.get_by_test_id("model-page-failure")
    await expect(failure).to_contain_text("upstream command exited prematurely")
    await expect(failure).to_contain_text("out of memory (simulated)")
    await expect(page.get_by_test_id("model-page-reason")).to_be_hidden()  # the box says it, once
    await expect(page.get_by_test_id("model-page-swaps").locator("td[data-label='Result']")).to_contain_text(
        "failed: upstream command exited prematurely")
    await expect(page.get_by_test_id("model-page-load")).to_be_enabled()  # another attempt
    await expect(page.locator(".toast")).to_have_count(0)  # the box says it; no toast says it again
    await tabs.shot(page, "failed")

    await page.goto(ls.url + "/ui/model/fine")
    await page.get_by_test_id("model-page-load").click()
    await expect(page.get_by_test_id("model-page-state")).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("model-page-ttl")).to_contain_text(re.compile(r"10m 00s · unloads in \d+m \d\ds"))
    await expect(page.get_by_test_id("model-page-ttl-left")).to_have_text(re.compile(r"^\d+m \d\ds$"))
    await page.get_by_test_id("model-page-unload").click()
    await expect(page.get_by_test_id("model-page-state")).to_have_text("stopped")
    await expect(page.get_by_test_id("model-page-reason")).to_have_text(re.compile("^Stopped: .+"))
    await expect(page.get_by_test_id("model-page-swaps").locator("tbody tr").first).to_contain_text("stopped")
    async with aiohttp.ClientSession() as s:
        assert await model_states(s, ls) == {}


async def test_a_sleeping_model_offers_wake_and_its_wake_times_show(start_llama_swap, upstreams, tabs):
    sleep = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}
    ls = start_llama_swap({"healthCheckTimeout": 60, "models": {
        "a": {"cmd": upstreams.cmd(name="a"), "sleep": sleep},
        "b": {"cmd": upstreams.cmd(name="b"), "sleep": sleep}}})
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "a")
        await chat(s, ls, "b")  # one at a time: a goes to sleep
    page = await tabs.open(ls, "/ui/model/a")
    state, wake = page.get_by_test_id("model-page-state"), page.get_by_test_id("model-page-load")
    await expect(state).to_have_text("sleeping")
    await expect(page.get_by_test_id("model-page-reason")).to_have_text(re.compile("^Asleep: .+"))
    await expect(wake).to_have_text("Wake")
    await expect(page.get_by_test_id("model-page-swaps").locator("tbody tr").first).to_contain_text("put to sleep")
    await expect(page.get_by_test_id("model-page-wake-times")).to_have_text("none yet")
    await tabs.shot(page, "sleeping")
    await wake.click()
    await expect(state).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("model-page-wake-times").locator(".tag")).to_have_count(1)
    await expect(page.get_by_test_id("model-page-swaps").locator("tbody tr").first).to_contain_text("woken")
    await tabs.shot(page, "woken")


async def test_settings_show_as_loaded_with_secrets_masked_and_a_slashed_id_or_alias_opens(start_llama_swap,
                                                                                          upstreams, tabs):
    ls = start_llama_swap({"models": {
        "org/m": {"cmd": f"env API_KEY=sk-cmd-secret {upstreams.cmd(name='m')}", "aliases": ["m-alias"],
                  "name": "The M model", "env": ["HF_TOKEN=hf_secret", "CUDA_VISIBLE_DEVICES=0"], "ttl": 120,
                  "filters": {"stripParams": "temperature, top_p"}},
        "other": {"cmd": upstreams.cmd(name="other")}},
        "groups": {"pair": {"swap": True, "members": ["org/m"]}, "rest": {"swap": True, "members": ["other"]}}})
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("model-link-org/m").click()
    await expect(page).to_have_url(f"{ls.url}/ui/model/org/m")
    await expect(page.get_by_test_id("model-page-title")).to_have_text("The M model")
    await expect(page).to_have_title("org/m · llama-swap")
    settings = page.get_by_test_id("model-page-settings")
    await expect(page.get_by_test_id("model-page-env").locator("li")).to_have_text(
        ["HF_TOKEN=[REDACTED]", "CUDA_VISIBLE_DEVICES=0"])
    await expect(page.get_by_test_id("model-page-cmd")).to_contain_text("API_KEY=[REDACTED]")
    await expect(page.get_by_test_id("model-page-cmd")).to_contain_text("--name m")
    await expect(settings).to_contain_text("stripParams")
    await expect(settings).to_contain_text("top_p")
    await expect(page.get_by_test_id("model-page-aliases")).to_have_text("m-alias")
    await expect(page.get_by_test_id("model-page-group")).to_contain_text("pair")
    await expect(page.get_by_test_id("model-page-about")).to_contain_text("2m 00s without requests, then unloaded")
    html = await page.content()
    assert "hf_secret" not in html and "sk-cmd-secret" not in html
    await tabs.shot(page, "settings", full_page=True)

    # By its alias: the same model, said to be opened by its alias.
    await page.goto(ls.url + "/ui/model/m-alias")
    await expect(page.get_by_test_id("model-page-title")).to_have_text("The M model")
    await expect(page.locator("main")).to_contain_text("opened by its alias m-alias")
    await expect(page.get_by_test_id("model-page-log")).to_contain_text("no output yet")


async def test_an_unknown_id_says_there_is_no_such_model_and_leads_back(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/model/no/such-model")
    missing = page.get_by_test_id("model-page-missing")
    await expect(missing.locator("h1")).to_have_text("No such model")
    await expect(missing).to_contain_text('no model (or alias) named "no/such-model"')
    await tabs.shot(page, "missing")
    await page.get_by_test_id("model-page-back").click()
    await expect(page).to_have_url(f"{ls.url}/ui/models")
    await expect(page.get_by_test_id("model-state-m")).to_have_text("stopped")


async def detail_requests_while(page: Page, seconds: float) -> list[str]:
    """The /api/models/ and /logs/stream/ requests the page makes in the next `seconds`."""
    seen: list[str] = []

    def note(request) -> None:
        if "/api/models/" in request.url or "/logs/stream/" in request.url or "/api/metrics/" in request.url:
            seen.append(request.url)
    page.on("request", note)
    await asyncio.sleep(seconds)  # measuring an absence: nothing to wait for
    page.remove_listener("request", note)
    return seen


async def test_the_page_fits_a_phone_reads_in_the_dark_and_stops_everything_when_left(start_llama_swap, upstreams,
                                                                                      tabs):
    long_id = "org/a-model-with-a-rather-long-name-Q4_K_M"
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {
        long_id: {"cmd": upstreams.cmd(name="long"), "aliases": ["long"], "env": ["HF_TOKEN=hf_secret"],
                  "description": "a description long enough to need a second line on a phone"},
        "b": {"cmd": upstreams.cmd(name="b")}}})
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "long")
        await chat(s, ls, "b")

    phone = {"width": 375, "height": 800}
    page = await tabs.open(ls, f"/ui/model/{long_id}", viewport=phone)
    await expect(page.get_by_test_id("model-page-swaps").locator("tbody tr")).to_have_count(2)
    await expect(page.get_by_test_id("model-page-activity").locator("tbody tr")).to_have_count(1)
    await expect(page.get_by_test_id("model-page-log")).to_contain_text("SIGTERM received")
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    await no_overflow(page, 375)
    await tabs.shot(page, "phone-375px", full_page=True)

    dark = await tabs.open(ls, f"/ui/model/{long_id}", color_scheme="dark", viewport=phone)
    await expect(dark.get_by_test_id("model-page-swaps").locator("tbody tr")).to_have_count(2)
    await expect(dark.get_by_test_id("model-page-activity").locator("tbody tr")).to_have_count(1)
    await no_overflow(dark, 375)
    await tabs.shot(dark, "dark-phone-375px", full_page=True)

    wide = await tabs.open(ls, f"/ui/model/{long_id}", color_scheme="dark", viewport={"width": 1280, "height": 900})
    await expect(wide.get_by_test_id("model-page-swaps").locator("tbody tr")).to_have_count(2)
    await expect(wide.get_by_test_id("model-page-log")).to_contain_text("SIGTERM received")
    await tabs.shot(wide, "dark", full_page=True)

    # Leaving the page ends its polling and its log stream.
    await wide.locator("main").get_by_role("link", name="← Models").click()
    await expect(wide.get_by_test_id("model-state-b")).to_have_text("ready")
    assert await detail_requests_while(wide, 6) == []
