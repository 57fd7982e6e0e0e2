"""The web UI's settings page and what follows it, in headless Chromium: the theme (an explicit
choice wins over the browser's colour scheme and survives a reload), the time format of the
activity page's times, the activity page's rows per page, the lines the logs page keeps, a
corrupt stored value, Reset; the activity page's tokens/s chart drawn by uPlot; the header on
one line above the width where the nav folds.

The preferences live in the browser (localStorage); every test starts from a fresh browser
context, so from the defaults. Screenshots land in test-output/ui/<test>-<step>.png.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from helpers import eventually
from ui_harness import MODEL_START_MS, Page, activity_rows, expect

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "llama-swap-ui.prefs"  # prefs.js
DEFAULTS = {"theme": "system", "timeFormat": "locale", "activityPageSize": 25, "logLines": 5000}
LIGHT_BG, DARK_BG = "rgb(246, 247, 249)", "rgb(18, 21, 26)"  # --bg of each theme (style.css)
# Every colour the themes set: an explicit "dark" and a dark system must give the same ones.
THEME_VARIABLES = ["--bg", "--panel", "--text", "--muted", "--border", "--accent", "--accent-text", "--danger", "--ok",
                   "--warn", "--code-bg", "--log-bg", "--log-text", *[f"--chart-{i}" for i in range(1, 9)]]
PHONE = {"width": 375, "height": 800}
# en-US in UTC: the browser's own time format is known ("1/5/2026, 3:04:05 PM").
US_UTC = {"locale": "en-US", "timezone_id": "UTC"}

# An upstream that reports llama-server's timings, so rows carry prompt and generation speeds
# (the responder reports none): each request a little faster than the one before.
SPEED_SERVER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0

class Handler(BaseHTTPRequestHandler):
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"status": "ok"})

    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        count += 1
        message = {"role": "assistant", "content": "hi"}
        self.reply({"object": "chat.completion", "model": "fast",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
                    "timings": {"prompt_n": 20, "predicted_n": 10, "prompt_ms": 50, "predicted_ms": 200,
                                "prompt_per_second": 400.0 + 25 * count, "predicted_per_second": 50.0 + 5 * count}})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def speed_model(tmp_path: Path) -> dict:
    script = tmp_path / "speed_server.py"
    script.write_text(SPEED_SERVER)
    return {"cmd": f"{sys.executable} {script} ${{PORT}}", "checkEndpoint": "/health"}


async def chat(session: aiohttp.ClientSession, ls, model: str, times: int = 1) -> None:
    for _ in range(times):
        async with session.post(ls.url + "/v1/chat/completions",
                                json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200, await r.text()
            await r.read()


async def background(page: Page) -> str:
    return await page.evaluate("getComputedStyle(document.body).backgroundColor")


async def theme_variables(page: Page) -> dict[str, str]:
    return await page.evaluate("""(names) => {
        const style = getComputedStyle(document.documentElement);
        return Object.fromEntries(names.map((name) => [name, style.getPropertyValue(name).trim()]));
    }""", THEME_VARIABLES)


async def stored(page: Page) -> dict | None:
    text = await page.evaluate("(key) => localStorage.getItem(key)", KEY)
    return None if text is None else json.loads(text)


async def open_settings(tabs, ls, **options) -> Page:
    page = await tabs.open(ls, "/ui/settings", **options)
    await expect(page.locator("main h1")).to_have_text("Settings")
    await expect(page.get_by_test_id("settings-theme")).to_be_visible()
    return page


async def second_tab(tabs, page: Page, ls, path: str) -> Page:
    """Another tab of the same browser (same context, same localStorage), its errors recorded too."""
    other = await page.context.new_page()
    other.on("pageerror", lambda error: tabs.errors.append(f"{other.url}: {error}"))
    await other.goto(ls.url + path)
    return other


def no_overflow(width: int):
    return f"document.documentElement.scrollWidth <= {width}"


# Theme #####################################################################################

async def test_dark_chosen_in_a_light_browser_turns_every_page_dark_and_survives_a_reload(start_llama_swap,
                                                                                         upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/models", color_scheme="light")
    await expect(page.get_by_test_id("model-state-m")).to_have_text("stopped")
    assert await background(page) == LIGHT_BG
    await page.get_by_test_id("nav-settings").click()
    await expect(page).to_have_url(f"{ls.url}/ui/settings")
    await expect(page.get_by_test_id("nav-settings")).to_have_attribute("aria-current", "page")
    await expect(page).to_have_title("Settings · llama-swap")
    theme = page.get_by_test_id("settings-theme")
    await expect(theme).to_have_value("system")
    await tabs.shot(page, "light")

    await theme.select_option("dark")  # at once, no reload
    await expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    await expect(page.locator("body")).to_have_css("background-color", DARK_BG)
    await expect(page.locator('meta[name="color-scheme"]')).to_have_attribute("content", "dark")
    assert await page.evaluate("getComputedStyle(document.documentElement).colorScheme") == "dark"
    await expect(page.get_by_test_id("settings-status")).to_have_text("Saved in this browser.")
    assert await stored(page) == {**DEFAULTS, "theme": "dark"}
    await tabs.shot(page, "dark")

    await page.reload()
    await expect(theme).to_have_value("dark")
    await expect(page.locator("body")).to_have_css("background-color", DARK_BG)
    await page.get_by_test_id("nav-models").click()
    await expect(page.get_by_test_id("model-state-m")).to_have_text("stopped")
    assert await background(page) == DARK_BG
    await tabs.shot(page, "models-dark")

    # Another tab of the same browser follows at once (the storage event).
    other = await second_tab(tabs, page, ls, "/ui/logs")
    await expect(other.locator("body")).to_have_css("background-color", DARK_BG)
    await page.get_by_test_id("nav-settings").click()
    await theme.select_option("light")
    await expect(other.locator("body")).to_have_css("background-color", LIGHT_BG)
    await expect(other.locator("html")).to_have_attribute("data-theme", "light")


async def test_system_follows_the_browsers_colour_scheme_and_an_explicit_choice_beats_it(start_llama_swap, upstreams,
                                                                                         tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await open_settings(tabs, ls, color_scheme="dark")
    body, theme = page.locator("body"), page.get_by_test_id("settings-theme")
    await expect(theme).to_have_value("system")
    assert await page.locator("html").get_attribute("data-theme") is None
    await expect(body).to_have_css("background-color", DARK_BG)
    system_dark = await theme_variables(page)

    await page.emulate_media(color_scheme="light")  # the system switches
    await expect(body).to_have_css("background-color", LIGHT_BG)
    await theme.select_option("dark")
    await expect(body).to_have_css("background-color", DARK_BG)
    # The dark colours are written twice in style.css (chosen, and the system's): the same.
    assert await theme_variables(page) == system_dark

    await page.emulate_media(color_scheme="dark")
    await theme.select_option("light")  # light in a dark system
    await expect(body).to_have_css("background-color", LIGHT_BG)
    await expect(page.locator('meta[name="color-scheme"]')).to_have_attribute("content", "light")
    await tabs.shot(page, "light-in-a-dark-system")
    await theme.select_option("system")
    await expect(body).to_have_css("background-color", DARK_BG)
    await expect(page.locator('meta[name="color-scheme"]')).to_have_attribute("content", "light dark")


# Time format and rows per page on the activity page #######################################

async def test_the_time_format_changes_how_the_activity_rows_show_their_times(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "m")
        assert await eventually(lambda: activity_rows(s, ls), 15)
        [row] = await activity_rows(s, ls)
    page = await tabs.open(ls, "/ui/activity", **US_UTC)
    time_cell = page.get_by_test_id(f"activity-row-{row['id']}").locator("td").nth(1)
    await expect(time_cell).to_have_text(re.compile(r"^\d{1,2}/\d{1,2}/\d{4}, \d{1,2}:\d\d:\d\d [AP]M$"))

    # The settings in a second tab: the activity tab follows without a reload.
    settings = await second_tab(tabs, page, ls, "/ui/settings")
    time_format = settings.get_by_test_id("settings-time-format")
    await time_format.select_option("24h")
    await expect(time_cell).to_have_text(re.compile(r"^\d{1,2}/\d{1,2}/\d{4}, \d\d:\d\d:\d\d$"))
    await time_format.select_option("iso")
    # Local time, which is UTC here: the row's own timestamp to the second.
    expected = row["timestamp"][:19].replace("T", " ")
    await expect(time_cell).to_have_text(expected)
    await tabs.shot(page, "iso")
    await time_format.select_option("12h")
    await expect(time_cell).to_have_text(re.compile(r"^\d{1,2}/\d{1,2}/\d{4}, \d{1,2}:\d\d:\d\d [AP]M$"))
    # Each choice shows how a time reads in it.
    await expect(time_format.locator("option[value=iso]")).to_have_text(
        re.compile(r"^ISO 8601 \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)$"))

    await page.reload()  # and it was kept
    await expect(time_cell).to_have_text(re.compile(r"^\d{1,2}/\d{1,2}/\d{4}, \d{1,2}:\d\d:\d\d [AP]M$"))


async def test_rows_per_page_sets_the_activity_pages_page_size_both_ways(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "m", times=12)
        assert await eventually(lambda: _count_is(s, ls, 12), 15)
    page = await tabs.open(ls, "/ui/activity")
    rows = page.get_by_test_id("activity-table").locator("tbody tr")
    info, limit = page.get_by_test_id("activity-page"), page.get_by_test_id("activity-limit")
    await expect(limit).to_have_value("25")
    await expect(rows).to_have_count(12)
    await expect(info).to_have_text("page 1 of 1 · 12 requests")

    await page.get_by_test_id("nav-settings").click()
    await page.get_by_test_id("settings-activity-rows").select_option("10")
    await page.get_by_test_id("nav-activity").click()
    await expect(limit).to_have_value("10")
    await expect(rows).to_have_count(10)
    await expect(info).to_have_text("page 1 of 2 · 12 requests")
    await page.get_by_test_id("activity-next").click()
    await expect(rows).to_have_count(2)
    await expect(info).to_have_text("page 2 of 2 · 12 requests")
    await tabs.shot(page, "ten-per-page")

    # The page's own choice is the setting too.
    await limit.select_option("50")
    await expect(rows).to_have_count(12)
    await expect(info).to_have_text("page 1 of 1 · 12 requests")
    assert (await stored(page))["activityPageSize"] == 50
    await page.get_by_test_id("nav-settings").click()
    await expect(page.get_by_test_id("settings-activity-rows")).to_have_value("50")


async def _count_is(session: aiohttp.ClientSession, ls, count: int) -> bool:
    async with session.get(ls.url + "/api/metrics/activity?limit=100") as r:
        return (await r.json())["total"] == count


# Logs page #################################################################################

async def test_the_log_lines_kept_cap_the_logs_page_at_once(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/logs")
    output = page.get_by_test_id("log-output")
    lines = output.locator(".log-line")
    await expect(output).to_contain_text("listening on")
    first, last = f"first-{uuid.uuid4().hex}", f"last-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as s:
        # One access-log line each: 1,100 lines past what the page had.
        for i in range(1100):
            agent = first if i == 0 else last if i == 1099 else "filler"
            async with s.get(ls.url + "/v1/models", headers={"User-Agent": agent}) as r:
                assert r.status == 200
    await expect(output.locator(".log-line", has_text=last)).to_have_count(1)
    count = await lines.count()
    assert count > 1100  # under the default 5,000: all of them
    await expect(output.locator(".log-line", has_text=first)).to_have_count(1)

    # 1,000 chosen in another tab: this one drops its oldest lines at once.
    settings = await second_tab(tabs, page, ls, "/ui/settings")
    await settings.get_by_test_id("settings-log-lines").select_option("1000")
    await expect(lines).to_have_count(1000)
    await expect(output.locator(".log-line", has_text=first)).to_have_count(0)
    await expect(output.locator(".log-line", has_text=last)).to_have_count(1)
    await tabs.shot(page, "capped")

    # On a fresh load the cap holds as the history comes in.
    await page.reload()
    await expect(output.locator(".log-line", has_text=last)).to_have_count(1)
    await expect(lines).to_have_count(1000)


# Stored values, reset, phone ###############################################################

async def test_a_corrupt_stored_value_gives_the_defaults_without_a_script_error(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await open_settings(tabs, ls, color_scheme="light")
    await page.evaluate("(key) => localStorage.setItem(key, '{\"theme\": \"dark\", not json')", KEY)
    await page.reload()
    await expect(page.get_by_test_id("settings-problem")).to_have_text(re.compile("could not be read"))
    for test_id, value in (("settings-theme", "system"), ("settings-time-format", "locale"),
                           ("settings-activity-rows", "25"), ("settings-log-lines", "5000")):
        await expect(page.get_by_test_id(test_id)).to_have_value(value)
    assert await page.locator("html").get_attribute("data-theme") is None
    assert await background(page) == LIGHT_BG
    await tabs.shot(page, "corrupt")
    await page.get_by_test_id("nav-activity").click()  # the other pages run on the defaults
    await expect(page.get_by_test_id("activity-limit")).to_have_value("25")
    await page.get_by_test_id("nav-logs").click()
    await expect(page.get_by_test_id("log-output")).to_contain_text("listening on")

    # Half right: the good fields are kept, the rest are defaults, and that is not an error.
    bad = {"theme": "purple", "timeFormat": "iso", "activityPageSize": 7, "logLines": "lots", "extra": 1}
    await page.evaluate("([key, value]) => localStorage.setItem(key, value)", [KEY, json.dumps(bad)])
    await page.goto(ls.url + "/ui/settings")
    await expect(page.get_by_test_id("settings-time-format")).to_have_value("iso")
    await expect(page.get_by_test_id("settings-theme")).to_have_value("system")
    await expect(page.get_by_test_id("settings-activity-rows")).to_have_value("25")
    await expect(page.get_by_test_id("settings-problem")).to_be_hidden()
    for value in ("[1, 2]", "null", '"dark"'):  # JSON, but not settings
        await page.evaluate("([key, value]) => localStorage.setItem(key, value)", [KEY, value])
        await page.reload()
        await expect(page.get_by_test_id("settings-theme")).to_have_value("system")
        await expect(page.get_by_test_id("settings-time-format")).to_have_value("locale")


async def test_reset_brings_back_the_defaults_and_forgets_the_stored_value(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await open_settings(tabs, ls, color_scheme="light")
    reset = page.get_by_test_id("settings-reset")
    await expect(reset).to_be_disabled()  # nothing to reset yet
    await page.get_by_test_id("settings-theme").select_option("dark")
    await page.get_by_test_id("settings-time-format").select_option("iso")
    await page.get_by_test_id("settings-activity-rows").select_option("100")
    await page.get_by_test_id("settings-log-lines").select_option("50000")
    assert await stored(page) == {"theme": "dark", "timeFormat": "iso", "activityPageSize": 100, "logLines": 50000}
    await expect(page.locator("body")).to_have_css("background-color", DARK_BG)
    await tabs.shot(page, "changed")

    await reset.click()
    for test_id, value in (("settings-theme", "system"), ("settings-time-format", "locale"),
                           ("settings-activity-rows", "25"), ("settings-log-lines", "5000")):
        await expect(page.get_by_test_id(test_id)).to_have_value(value)
    await expect(page.locator("body")).to_have_css("background-color", LIGHT_BG)
    assert await page.locator("html").get_attribute("data-theme") is None
    await expect(page.get_by_test_id("settings-status")).to_have_text("Back to the defaults.")
    await expect(reset).to_be_disabled()
    assert await stored(page) is None
    await page.reload()
    await expect(page.get_by_test_id("settings-theme")).to_have_value("system")

    # An unreadable stored value can be reset even though what shows is the defaults.
    await page.evaluate("(key) => localStorage.setItem(key, 'nonsense')", KEY)
    await page.reload()
    await expect(reset).to_be_enabled()
    await reset.click()
    await expect(page.get_by_test_id("settings-problem")).to_be_hidden()
    assert await stored(page) is None


async def test_the_settings_page_fits_a_phone(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await open_settings(tabs, ls, viewport=PHONE, color_scheme="dark")
    await expect(page.get_by_test_id("nav-settings")).to_be_hidden()  # folded behind Menu
    await expect(page.get_by_test_id("settings-reset")).to_be_visible()
    assert await page.evaluate(no_overflow(PHONE["width"]))
    await tabs.shot(page, "phone-dark", full_page=True)
    await page.get_by_test_id("settings-theme").select_option("light")
    await page.get_by_test_id("settings-time-format").select_option("12h")
    assert await page.evaluate(no_overflow(PHONE["width"]))
    await tabs.shot(page, "phone-light", full_page=True)


# The activity page's chart #################################################################

async def test_the_activity_tokens_per_second_chart_is_drawn_by_uplot(start_llama_swap, upstreams, tabs, tmp_path):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {
        "fast": speed_model(tmp_path), "m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/activity", color_scheme="light", **US_UTC)
    chart = page.get_by_test_id("speed-chart")
    await expect(page.locator("p.empty", has_text="No requests recorded yet.")).to_be_visible()
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "m")  # the responder reports no speeds
        await expect(page.get_by_test_id("speed-chart-empty")).to_be_visible(timeout=MODEL_START_MS)
        await chat(s, ls, "fast", times=4)
    await expect(chart.locator(".uplot canvas")).to_have_count(1, timeout=MODEL_START_MS)
    await expect(chart).to_have_attribute("aria-label", "Prompt and generation tokens per second of 4 requests")
    legend = chart.locator(".u-legend")
    await expect(legend).to_contain_text("generation")
    await expect(legend).to_contain_text("prompt")
    # At rest the legend names the newest request and its speeds; on a point, that one.
    async with aiohttp.ClientSession() as s:
        newest = max(row["id"] for row in await activity_rows(s, ls))
    await expect(legend).to_contain_text(f"#{newest} fast · ")
    await expect(legend).to_contain_text(re.compile(r"generation\s*70\.0 t/s"))  # the fourth: 50 + 5 * 4
    await expect(legend).to_contain_text(re.compile(r"prompt\s*500\.0 t/s"))  # 400 + 25 * 4
    box = await chart.locator(".u-over").bounding_box()
    await page.mouse.move(box["x"] + 1, box["y"] + box["height"] / 2)
    await expect(legend).to_contain_text(re.compile(r"generation\s*55\.0 t/s"))  # the first
    await expect(legend).to_contain_text(re.compile(r"prompt\s*425\.0 t/s"))
    await tabs.shot(page, "chart-light")

    # A new request redraws the same chart; a theme change builds it again in the new colours.
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "fast")
    await expect(chart).to_have_attribute("aria-label", "Prompt and generation tokens per second of 5 requests")
    await expect(page.locator(".uplot")).to_have_count(1)
    settings = await second_tab(tabs, page, ls, "/ui/settings")
    await settings.get_by_test_id("settings-theme").select_option("dark")
    await expect(page.locator("body")).to_have_css("background-color", DARK_BG)
    await expect(chart.locator(".uplot canvas")).to_have_count(1)
    await tabs.shot(page, "chart-dark")

    # Filtered to the model without speeds: no chart, said in words; and on a phone it fits.
    await page.get_by_test_id("activity-model").select_option("m")
    await expect(page.get_by_test_id("speed-chart-empty")).to_be_visible()
    assert await page.locator(".uplot").count() == 0
    await page.get_by_test_id("activity-model").select_option("")
    await expect(chart.locator(".uplot canvas")).to_have_count(1)
    await page.set_viewport_size(PHONE)
    await expect(page.get_by_test_id("nav-activity")).to_be_hidden()
    assert await eventually(lambda: page.evaluate(no_overflow(PHONE["width"])), 5)
    await tabs.shot(page, "chart-phone", full_page=True)

    # Leaving the page takes the chart with it.
    await page.goto(ls.url + "/ui/models")
    await expect(page.get_by_test_id("model-state-fast")).to_be_visible()
    assert await page.locator(".uplot").count() == 0


# Header ####################################################################################

FOLD_PX = 1120  # style.css: the nav folds behind Menu at this width and below


async def header_layout(page: Page) -> dict:
    return await page.evaluate("""() => {
        const bar = document.querySelector('.topbar');
        const links = [...document.querySelectorAll('#nav a')];
        return {
            height: bar.getBoundingClientRect().height,
            overflows: bar.scrollWidth > bar.clientWidth,
            tops: [...new Set(links.map((a) => Math.round(a.getBoundingClientRect().top)))],
            visible: links.filter((a) => a.getBoundingClientRect().width > 0).length,
        };
    }""")


async def test_the_header_fits_one_line_above_the_fold_and_folds_below_it(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/settings", viewport={"width": 1280, "height": 800})
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    wide = await header_layout(page)
    assert wide["visible"] == 9 and len(wide["tops"]) == 1 and not wide["overflows"], wide
    await tabs.shot(page, "1280")
    # Just above the fold, even with the indicator's longest word.
    await page.set_viewport_size({"width": FOLD_PX + 1, "height": 800})
    await page.evaluate("document.getElementById('connection-state').textContent = 'reconnecting'")
    narrow = await header_layout(page)
    assert narrow == {**wide, "height": narrow["height"]} and narrow["height"] == wide["height"], (narrow, wide)
    await expect(page.get_by_role("button", name="Menu")).to_be_hidden()
    await tabs.shot(page, "just-above-the-fold")
    await page.set_viewport_size({"width": FOLD_PX, "height": 800})
    await expect(page.get_by_role("button", name="Menu")).to_be_visible()
    await expect(page.get_by_test_id("nav-settings")).to_be_hidden()
    folded = await header_layout(page)
    assert folded["height"] == wide["height"] and not folded["overflows"], folded
