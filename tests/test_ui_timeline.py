"""The UI's swap timeline page (/ui/timeline) in headless Chromium: a lane per model with its
states, a marker per swap with what caused it, the queue depth under the lanes and the list of
state changes in words, live and after a reload (GET /api/timeline, GET /api/swaps).

Needs the playwright package and Debian's Chromium at /usr/bin/chromium; without either the
module is skipped (ui_harness). Screenshots land in test-output/ui/<test>-<step>.png.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from ui_harness import MODEL_START_MS, Page, expect

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = aiohttp.ClientTimeout(total=60)
SWAPPED_FOR_B = re.compile(r"a stopp(ing|ed) — swapped out to make room for b \(request POST /v1/chat/completions")


def two_models(upstreams) -> dict:
    """a starts slowly (its requests wait: a queue), b at once; no groups: one at a time."""
    return {"healthCheckTimeout": 60, "models": {
        "a": {"cmd": upstreams.cmd("--startup-delay", "1", name="a")},
        "b": {"cmd": upstreams.cmd(name="b")}}}


async def chat(s: aiohttp.ClientSession, ls, model: str) -> int:
    async with s.post(ls.url + "/v1/chat/completions", json={"model": model, "messages": []}) as r:
        await r.read()
        return r.status


async def swap_a_then_b(ls) -> None:
    """Two requests for a wait together while it loads; then b's request swaps a out."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await asyncio.gather(chat(s, ls, "a"), chat(s, ls, "a")) == [200, 200]
        assert await chat(s, ls, "b") == 200


async def open_timeline(tabs, ls, path: str = "/ui/timeline", **options) -> Page:
    page = await tabs.open(ls, path, **options)
    await expect(page.locator("main h1")).to_have_text("Timeline")
    await expect(page.get_by_test_id("tl-summary")).to_contain_text("in the last")
    return page


async def test_a_swap_shows_live_with_its_cause_and_again_after_a_reload(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap(two_models(upstreams))
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("nav-timeline").click()
    await expect(page).to_have_url(f"{ls.url}/ui/timeline")
    await expect(page).to_have_title("Timeline · llama-swap")
    # Before anything ran: a lane for each configured model (from the model list), both stopped.
    for model in ("a", "b"):
        await expect(page.get_by_test_id(f"tl-lane-{model}")).to_be_visible()
        await expect(page.get_by_test_id(f"tl-state-{model}")).to_have_text("stopped")
    await expect(page.get_by_test_id("tl-list-empty")).to_be_visible()
    await expect(page.get_by_test_id("tl-queue-peak")).to_have_text("No request waited in this window.")

    await swap_a_then_b(ls)  # while the page is open: it follows the events

    items = page.get_by_test_id("tl-item")
    await expect(items.first).to_contain_text(re.compile(r"b ready — loaded in"), timeout=MODEL_START_MS)
    stopped = items.filter(has_text=SWAPPED_FOR_B)
    await expect(stopped).to_have_count(2)  # stopping, then stopped
    await expect(stopped.first).to_contain_text("a stopped — ")
    await expect(stopped.last).to_contain_text("a stopping — ")
    await expect(items.filter(has_text=re.compile(r"b starting — for request POST /v1/chat/completions .*; "
                                                  r"a stopped to make room"))).to_have_count(1)
    await expect(page.get_by_test_id("tl-state-b")).to_have_text("ready")
    await expect(page.get_by_test_id("tl-state-a")).to_have_text("stopped")
    # Lanes: on an hour a few seconds are a few pixels, but a's serving shows, then stopped; and
    # markers where a started and where it was stopped.
    lane_a = page.get_by_test_id("tl-lane-a")
    for state in ("serving", "stopped"):
        await expect(lane_a.locator(f"rect.tl-s-{state}").first).to_be_attached()
    await expect(lane_a.locator(".tl-marker")).to_have_count(2)
    await expect(page.get_by_test_id("tl-lane-b").locator(".tl-marker")).to_have_count(1)
    stop_marker = lane_a.locator(".tl-marker-stop")
    await expect(stop_marker).to_have_attribute("aria-label", re.compile(r"^Swap at .*: b started, a stopped$"))
    await expect(stop_marker).to_have_attribute("title", re.compile(r"a: one model at a time"))
    # Both a's requests waited while it loaded.
    peak = page.get_by_test_id("tl-queue-peak")
    await expect(peak).to_have_text(re.compile(r"^Most requests waiting for one model: 2 \(a at \d.*\)$"))
    await expect(peak).to_have_attribute("data-peak", "2")
    await expect(page.get_by_test_id("tl-queue-max")).to_have_text("0 to 2")

    # The marker by keyboard: focus shows the swap's details, the Close button hides them.
    details = page.get_by_test_id("tl-details")
    await expect(details).to_be_hidden()
    await stop_marker.focus()
    await expect(details).to_be_visible()
    await expect(details).to_contain_text("Startedb")
    await expect(details).to_contain_text("Stoppeda — one model at a time (no groups configured)")
    await expect(details).to_contain_text("RequestPOST /v1/chat/completions")
    await expect(details).to_contain_text("Resultok")
    await tabs.shot(page, "details")
    await details.get_by_role("button", name="Close the details").click()
    await expect(details).to_be_hidden()
    # And by a click (a tap): the start marker on b's lane.
    await page.get_by_test_id("tl-lane-b").locator(".tl-marker-start").click()
    await expect(details).to_be_visible()
    await expect(details).to_contain_text("Startedb")
    await tabs.shot(page, "light")

    # A reload reads the same history back from the server.
    texts = await items.all_text_contents()
    assert len(texts) == 6  # a: starting, ready, stopping, stopped; b: starting, ready
    await page.reload()
    await expect(page.get_by_test_id("tl-item")).to_have_text(texts)
    await expect(page.get_by_test_id("tl-lane-a").locator(".tl-marker")).to_have_count(2)
    await expect(page.get_by_test_id("tl-queue-peak")).to_have_attribute("data-peak", "2")
    await tabs.shot(page, "reloaded")


async def test_the_window_selector_changes_the_span_and_keeps_the_history(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap(two_models(upstreams))
    await swap_a_then_b(ls)
    page = await open_timeline(tabs, ls)
    chart, window = page.get_by_test_id("tl-chart"), page.get_by_test_id("tl-window")
    summary = page.get_by_test_id("tl-summary")
    items = page.get_by_test_id("tl-item")
    await expect(window).to_have_value("1h")
    await expect(chart).to_have_attribute("data-span-s", "3600")
    await expect(summary).to_have_text("2 models · 6 state changes · 2 swaps in the last 1 h")
    for value, seconds, label in (("5m", 300, "5 min"), ("15m", 900, "15 min"), ("1h", 3600, "1 h")):
        await window.select_option(value)
        await expect(page).to_have_url(f"{ls.url}/ui/timeline?window={value}")
        await expect(chart).to_have_attribute("data-span-s", str(seconds))
        await expect(summary).to_have_text(f"2 models · 6 state changes · 2 swaps in the last {label}")
        await expect(items.filter(has_text=SWAPPED_FOR_B)).to_have_count(2)
        if value == "5m":  # a's second and more of starting is wide enough here to show
            for state in ("starting", "serving", "stopped"):
                await expect(page.get_by_test_id("tl-lane-a").locator(f"rect.tl-s-{state}").first).to_be_attached()
        # The axis is labelled every minute (5 min), 3 minutes (15 min), 10 minutes (1 h).
        assert 4 <= await page.get_by_test_id("tl-axis").locator(".tl-tick").count() <= 6
        await tabs.shot(page, value)
    # The window in the address is the one the page opens with.
    again = await open_timeline(tabs, ls, "/ui/timeline?window=15m")
    await expect(again.get_by_test_id("tl-window")).to_have_value("15m")
    await expect(again.get_by_test_id("tl-chart")).to_have_attribute("data-span-s", "900")
    await expect(again.get_by_test_id("tl-item").filter(has_text=SWAPPED_FOR_B)).to_have_count(2)


LABELS_APART = """() => {
    const ticks = document.querySelectorAll('[data-testid=tl-axis] .tl-tick');
    const boxes = [...ticks].map((e) => e.getBoundingClientRect());
    return boxes.length >= 1 && boxes.every((box, i) => i === 0 || boxes[i - 1].right <= box.left);
}"""


async def test_on_a_phone_in_the_dark_nothing_overflows(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap(two_models(upstreams))
    await swap_a_then_b(ls)
    width = 375
    page = await open_timeline(tabs, ls, color_scheme="dark", viewport={"width": width, "height": 800})
    await expect(page.get_by_test_id("tl-item").filter(has_text=SWAPPED_FOR_B)).to_have_count(2)
    await expect(page.get_by_test_id("tl-lane-a").locator(".tl-marker-stop")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    # Fewer labels on the time axis, none over another.
    assert await page.evaluate(LABELS_APART), "time axis labels overlap"
    # The lanes take the width that is left beside their labels, no more.
    box = await page.get_by_test_id("tl-lane-a").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    # Tapping a marker opens its details, which wrap within the screen too.
    await page.get_by_test_id("tl-lane-a").locator(".tl-marker-stop").click()
    await expect(page.get_by_test_id("tl-details")).to_contain_text("one model at a time")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    await tabs.shot(page, "dark-375px", full_page=True)


async def test_what_leaves_the_window_is_dropped_and_the_lanes_keep_the_state_it_left(start_llama_swap, upstreams,
                                                                                       tabs):
    ls = start_llama_swap(two_models(upstreams))
    await swap_a_then_b(ls)
    page = await open_timeline(tabs, ls, "/ui/timeline?window=5m")
    await page.clock.install()  # the page's clock, from the next load on: time flows, and may jump
    await page.reload()
    items = page.get_by_test_id("tl-item")
    await expect(items).to_have_count(6)
    await expect(page.get_by_test_id("tl-queue-peak")).to_have_attribute("data-peak", "2")

    await page.clock.fast_forward("06:00")  # six minutes on: everything is older than the window
    await expect(items).to_have_count(0)
    await expect(page.get_by_test_id("tl-list-empty")).to_be_visible()
    summary = page.get_by_test_id("tl-summary")
    await expect(summary).to_have_text("2 models · 0 state changes · 0 swaps in the last 5 min")
    await expect(page.get_by_test_id("tl-queue-peak")).to_have_text("No request waited in this window.")
    # The lanes start in the state the dropped entries left: b ready all along, a stopped.
    lane_a, lane_b = page.get_by_test_id("tl-lane-a"), page.get_by_test_id("tl-lane-b")
    await expect(lane_b.locator("rect")).to_have_count(1)
    await expect(lane_b.locator("rect.tl-s-ready")).to_have_count(1)
    await expect(lane_a.locator("rect")).to_have_count(1)
    await expect(lane_a.locator("rect.tl-s-stopped")).to_have_count(1)
    await expect(lane_a.locator(".tl-marker:visible")).to_have_count(0)
    await tabs.shot(page, "six-minutes-later")


async def test_a_model_put_to_sleep_and_woken_shows_as_such(start_llama_swap, upstreams, tabs):
    sleep = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}
    ls = start_llama_swap({"healthCheckTimeout": 60, "models": {
        "a": {"cmd": upstreams.cmd("--wake-delay", "1", name="a"), "sleep": sleep},
        "b": {"cmd": upstreams.cmd(name="b"), "sleep": sleep}}})
    page = await open_timeline(tabs, ls, "/ui/timeline?window=5m")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for model in ("a", "b", "a"):  # a sleeps to make room for b, then wakes (and b sleeps)
            assert await chat(s, ls, model) == 200
    items = page.get_by_test_id("tl-item")
    slept = re.compile(r"a sleeping — to make room for b \(request POST ")
    woke = re.compile(r"a waking — for request POST .*; b put to sleep to make room")
    await expect(items.filter(has_text=slept)).to_have_count(1)
    await expect(items.filter(has_text=woke)).to_have_count(1)
    await expect(items.filter(has_text=re.compile(r"a ready — woke in"))).to_have_count(1)
    lane_a = page.get_by_test_id("tl-lane-a")
    await expect(lane_a.locator("rect.tl-s-waking").first).to_be_attached()  # a second of it: wide enough
    await expect(page.get_by_test_id("tl-lane-b").locator("rect.tl-s-sleeping").first).to_be_attached()
    await expect(lane_a.locator(".tl-marker-sleep")).to_have_count(1)
    await expect(lane_a.locator(".tl-marker-wake")).to_have_count(1)
    await expect(page.get_by_test_id("tl-state-a")).to_have_text("ready")
    await expect(page.get_by_test_id("tl-state-b")).to_have_text("sleeping")
    await lane_a.locator(".tl-marker-wake").click()
    await expect(page.get_by_test_id("tl-details")).to_contain_text("Wokea")
    await expect(page.get_by_test_id("tl-details")).to_contain_text("Put to sleepb")
    # One request at a time: one waited for each model, never two at once for one.
    await expect(page.get_by_test_id("tl-queue-peak")).to_have_text(
        re.compile(r"^Most requests waiting for one model: 1 \(a at .*, b at .*\)$"))
    await tabs.shot(page, "woken")
    # The lanes are drawn again as things change; a marker with the focus keeps it.
    wake = lane_a.locator(".tl-marker-wake")
    await wake.focus()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await chat(s, ls, "b") == 200
    await expect(items.filter(has_text=re.compile(r"b waking — for request"))).to_have_count(1)
    await expect(lane_a.locator(".tl-marker-sleep")).to_have_count(2)
    await expect(wake).to_be_focused()
