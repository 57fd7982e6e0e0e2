"""The web UI end to end in headless Chromium: a real llama-swap with responder upstreams,
driven through its pages the way a person uses them.

Needs the playwright package and Debian's Chromium at /usr/bin/chromium (never a browser that
Playwright downloads); without either the module is skipped. One browser serves the whole module
(its own event loop, module-scoped); each test gets fresh browser contexts. Every screenshot lands
in test-output/ui/<test>-<step>.png for a reviewer to look at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid

import aiohttp
import pytest

from helpers import eventually, free_port
from ui_harness import MODEL_START_MS, Page, activity_rows, expect, fixed_port_model, model_states, responder_events

pytestmark = pytest.mark.asyncio(loop_scope="module")


# Frame and Models page #####################################################################

async def test_every_page_opens_from_the_nav_and_the_indicator_follows_the_connection(start_llama_swap, upstreams,
                                                                                      tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/")
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    await expect(page.get_by_test_id("model-state-m")).to_have_text("stopped")
    await expect(page).to_have_title("Models · llama-swap")
    for name, title in [("logs", "Logs"), ("activity", "Activity"), ("playground", "Playground"),
                        ("captures", "Captures"), ("models", "Models")]:
        await page.get_by_test_id(f"nav-{name}").click()
        await expect(page).to_have_url(f"{ls.url}/ui/{name}")
        await expect(page.locator("main h1")).to_have_text(title)
        await expect(page.get_by_test_id(f"nav-{name}")).to_have_attribute("aria-current", "page")
        await expect(page).to_have_title(f"{title} · llama-swap")
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")  # one stream for every page
    await tabs.shot(page, "connected")

    await page.goto(ls.url + "/ui/no-such-page")
    await expect(page.locator("main h1")).to_have_text("Page not found")

    ls.stop()  # the server goes away under the open page (the fixture's stop then finds it gone)
    await expect(page.get_by_test_id("connection-state")).to_have_text(re.compile("^(reconnecting|offline)$"))
    await tabs.shot(page, "server-gone")


async def test_load_on_the_models_page_shows_the_start_up_output_then_ready(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 60, "models": {
        "m": {"cmd": upstreams.cmd("--startup-delay", "4", name="m"), "description": "a slow starter"}}})
    page = await tabs.open(ls, "/ui/models")
    row = page.get_by_test_id("model-row-m")
    state, load, unload = (page.get_by_test_id("model-state-m"), page.get_by_test_id("load-m"),
                           page.get_by_test_id("unload-m"))
    await expect(row).to_contain_text("a slow starter")
    await expect(state).to_have_text("stopped")
    await expect(load).to_be_enabled()
    await expect(unload).to_be_disabled()

    await load.click()
    # The responder prints "loading model..." for four seconds before it even listens.
    await expect(state).to_have_text("starting")
    await expect(load).to_be_disabled()
    await expect(page.get_by_test_id("model-tail-m")).to_contain_text("loading model...")
    await tabs.shot(page, "starting")

    await expect(state).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("model-tail-m")).to_be_hidden()
    await expect(unload).to_be_enabled()
    await expect(load).to_be_disabled()
    await tabs.shot(page, "ready")
    async with aiohttp.ClientSession() as s:
        assert await model_states(s, ls) == {"m": "ready"}

        await unload.click()
        await expect(state).to_have_text("stopped")
        await expect(load).to_be_enabled()
        assert await model_states(s, ls) == {}


async def test_a_sleeping_model_says_so_and_its_button_wakes_it(start_llama_swap, upstreams, tabs):
    sleep = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}
    ls = start_llama_swap({"healthCheckTimeout": 60, "models": {
        "a": {"cmd": upstreams.cmd(name="a"), "sleep": sleep},
        "b": {"cmd": upstreams.cmd(name="b"), "sleep": sleep}}})
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("load-a").click()
    await expect(page.get_by_test_id("model-state-a")).to_have_text("ready", timeout=MODEL_START_MS)
    await page.get_by_test_id("load-b").click()  # one at a time: a goes to sleep
    await expect(page.get_by_test_id("model-state-b")).to_have_text("ready", timeout=MODEL_START_MS)
    state, wake = page.get_by_test_id("model-state-a"), page.get_by_test_id("load-a")
    await expect(state).to_have_text("sleeping")
    await expect(wake).to_have_text("Wake")
    await expect(wake).to_be_enabled()
    await tabs.shot(page, "sleeping")
    await wake.click()
    await expect(state).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("model-state-b")).to_have_text("sleeping")
    await tabs.shot(page, "woken")
    async with aiohttp.ClientSession() as s:
        assert await model_states(s, ls) == {"a": "ready", "b": "sleeping"}


async def test_a_starting_model_shows_how_far_its_load_has_got_and_what_is_left(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 60, "models": {
        "m": {"cmd": upstreams.cmd("--startup-delay", "6", "--load-progress", "dots", name="m")}}})
    page = await tabs.open(ls, "/ui/models")
    state, progress = page.get_by_test_id("model-state-m"), page.get_by_test_id("model-load-m")
    await expect(state).to_have_text("stopped")
    await expect(progress).to_be_hidden()

    await page.get_by_test_id("load-m").click()
    # The responder prints llama.cpp's progress dots over six seconds; the page follows them.
    await expect(state).to_have_text("starting")
    await expect(page.get_by_test_id("model-load-text-m")).to_have_text(re.compile(r"^loading \d+% · ~\d+ s left$"))
    await expect(progress.get_by_role("progressbar")).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d*$"))
    await tabs.shot(page, "loading")

    await expect(state).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(progress).to_be_hidden()


async def test_the_models_page_fits_a_phone(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {
        "org/a-model-with-a-rather-long-name-Q4_K_M": {"cmd": upstreams.cmd(name="long"), "aliases": ["long"],
                                                       "description": "a description long enough to need a second line "
                                                                      "on a phone"},
        "m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/models", viewport={"width": 390, "height": 844})
    await expect(page.get_by_test_id("model-state-m")).to_have_text("stopped")
    await expect(page.get_by_test_id("load-org/a-model-with-a-rather-long-name-Q4_K_M")).to_be_visible()
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    # The nav folds behind the Menu button; nothing scrolls sideways.
    await expect(page.get_by_test_id("nav-logs")).to_be_hidden()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await tabs.shot(page, "models-390px", full_page=True)

    await page.get_by_role("button", name="Menu").click()
    await expect(page.get_by_test_id("nav-logs")).to_be_visible()
    await tabs.shot(page, "menu-open")
    await page.get_by_test_id("nav-logs").click()
    await expect(page.locator("main h1")).to_have_text("Logs")
    await expect(page.get_by_test_id("nav-logs")).to_be_hidden()  # the menu closes on the way


async def test_a_request_in_flight_shows_on_the_models_page_and_cancel_stops_it_upstream(start_llama_swap, upstreams,
                                                                                         tabs):
    port = free_port()
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": fixed_port_model(upstreams, port, name="m")}})
    page = await tabs.open(ls, "/ui/models")
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    await expect(page.get_by_test_id("inflight-table")).to_be_hidden()
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "stream": True, "responder_chunks": 2000, "responder_delay": 0.05}
        async with s.post(ls.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # the answer is under way
            rows = page.locator("[data-testid^='inflight-row-']")
            await expect(rows).to_have_count(1)
            await expect(rows).to_contain_text("POST /v1/chat/completions")
            await expect(rows).to_contain_text("answering")
            await expect(rows.locator("td[data-label='Sent']")).not_to_have_text("0 B")  # the count moves
            model_row = page.get_by_test_id("model-row-m")
            await expect(model_row.locator("td[data-label='In flight']")).to_have_text("1")
            await expect(model_row.locator("td[data-label='Queued']")).to_have_text("0")
            await tabs.shot(page, "in-flight")
            await rows.locator("[data-testid^='inflight-cancel-']").click()
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended as if complete
                await asyncio.wait_for(r.read(), 15)  # (a TimeoutError: the cancel did not cut it)
        await expect(rows).to_have_count(0)
        await expect(page.get_by_test_id("inflight-table")).to_be_hidden()

        async def upstream_saw_the_disconnect() -> bool:
            return any(e["event"] == "client_disconnected" for e in await responder_events(s, port))
        assert await eventually(upstream_saw_the_disconnect, 15)


# Playground ################################################################################

async def test_the_playground_streams_a_reply_and_stop_ends_the_upstream_stream(start_llama_swap, upstreams, tabs):
    port = free_port()
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {
        "quick": {"cmd": upstreams.cmd(name="quick")},  # five chunks, 50 ms apart
        "slow": fixed_port_model(upstreams, port, "--chunks", "2000", "--chunk-delay", "0.05", name="slow")}})
    page = await tabs.open(ls, "/ui/playground?model=quick")
    model, send, stop = page.get_by_test_id("pg-model"), page.get_by_test_id("pg-send"), page.get_by_test_id("pg-stop")
    answer = page.get_by_test_id("pg-answer")
    meta = page.locator(".msg.assistant .meta").last
    await expect(model).to_have_value("quick")
    await expect(stop).to_be_disabled()

    await page.get_by_test_id("pg-system").fill("Answer briefly.")
    await page.get_by_test_id("pg-input").fill("hello")
    await send.click()
    await expect(answer).to_have_text("tok0 tok1 tok2 tok3 tok4")
    await expect(meta).to_contain_text("5 tokens")
    await expect(send).to_be_enabled()
    await expect(stop).to_be_disabled()
    await tabs.shot(page, "answered")
    async with aiohttp.ClientSession() as s:
        # What the page sent, as the capture of its request shows it.
        assert await eventually(lambda: activity_rows(s, ls), 15)
        [row] = await activity_rows(s, ls)
        async with s.get(ls.url + f"/api/captures/{row['id']}") as r:
            sent = json.loads(base64.b64decode((await r.json())["req_body"]))
        assert sent == {"model": "quick", "stream": True, "messages": [
            {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello"}]}

        await model.select_option("slow")
        await page.get_by_test_id("pg-input").fill("count to two thousand")
        await page.get_by_test_id("pg-input").press("Enter")
        await expect(stop).to_be_enabled(timeout=MODEL_START_MS)  # the swap to "slow" comes first
        await expect(answer).to_contain_text("tok3")
        await tabs.shot(page, "streaming")
        await stop.click()
        await expect(stop).to_be_disabled()
        await expect(send).to_be_enabled()
        await expect(meta).to_contain_text("stopped")
        await expect(page.locator(".msg.user")).to_have_count(2)
        await tabs.shot(page, "stopped")

        async def upstream_saw_the_disconnect() -> bool:
            return any(e["event"] == "client_disconnected" for e in await responder_events(s, port))
        assert await eventually(upstream_saw_the_disconnect, 15)
        assert not any(e["event"] == "stream_completed" for e in await responder_events(s, port))
    assert "tok1999" not in await answer.text_content()


async def test_the_playground_shows_why_a_model_failed_to_load_while_it_streamed_the_loading_text(
        start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 15, "sendLoadingState": True, "models": {
        "broken": {"cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.5", name="broken")}}})
    page = await tabs.open(ls, "/ui/playground?model=broken")
    await expect(page.get_by_test_id("pg-model")).to_have_value("broken")
    await page.get_by_test_id("pg-input").fill("hello")
    await page.get_by_test_id("pg-send").click()
    error = page.locator(".msg.assistant .error-text").last
    await expect(error).to_be_visible(timeout=MODEL_START_MS)
    await expect(error).to_contain_text("upstream command exited prematurely")
    await expect(error).to_contain_text("out of memory (simulated)")
    await expect(page.get_by_test_id("pg-send")).to_be_enabled()
    await tabs.shot(page, "load-failed")


async def test_the_playground_markdown_renders_model_text_without_injecting_html(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/playground")
    await expect(page.get_by_test_id("pg-model")).to_have_value("m")
    hostile = "\n\n".join([
        "**bold** and `code`",
        '<img src=x onerror="window.__pwned = 1">',
        "<script>window.__pwned = 2</script>",
        "[a link](javascript:window.__pwned=3) and [another](https://example.com/\"onmouseover=\"window.__pwned=4)",
        "```html\n<img src=x onerror=\"window.__pwned = 5\">\n```",
        "- <b onclick=\"window.__pwned = 6\">item</b>",
    ])
    result = await page.evaluate("""async (source) => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const box = document.createElement('div');
        box.className = 'md answer';
        box.innerHTML = renderMarkdown(source);  // as the playground shows an answer
        document.querySelector('main').append(box);
        await new Promise((resolve) => setTimeout(resolve, 300));  // time for an onerror to fire
        return {
            tags: [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
            handlers: [...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name))
                .filter((name) => name.startsWith('on')),
            hrefs: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
            text: box.textContent,
            pwned: window.__pwned ?? null,
        };
    }""", hostile)
    await tabs.shot(page, "hostile-markdown")
    assert result["pwned"] is None
    assert not {"img", "script", "b"} & set(result["tags"]), result["tags"]
    assert result["handlers"] == []
    assert result["hrefs"] and all(href.startswith(("http://", "https://"))
                                   for href in result["hrefs"]), result["hrefs"]
    assert {"strong", "code", "pre", "ul"} <= set(result["tags"])  # the markdown itself still renders
    assert '<img src=x onerror="window.__pwned = 1">' in result["text"]  # shown as the text it is


# Logs page #################################################################################

async def test_the_logs_page_shows_new_lines_live_filters_and_pauses(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/logs")
    output = page.get_by_test_id("log-output")
    await expect(page.get_by_test_id("log-source")).to_have_value("proxy")
    await expect(output).to_contain_text("listening on")  # the history comes first

    def line(text: str):
        return output.locator(".log-line", has_text=text)

    async with aiohttp.ClientSession() as s:
        first, second = f"ui-test-{uuid.uuid4().hex}", f"ui-test-{uuid.uuid4().hex}"
        async with s.get(ls.url + "/v1/models", headers={"User-Agent": first}) as r:
            assert r.status == 200
        await expect(line(first)).to_have_count(1)
        await expect(line(first)).to_contain_text('"GET /v1/models HTTP/1.1" 200')
        await tabs.shot(page, "live-line")

        await page.get_by_test_id("log-filter").fill(first)
        await expect(output.locator(".log-line:visible")).to_have_count(1)
        await tabs.shot(page, "filtered")
        await page.get_by_test_id("log-filter").fill("")
        await expect(output.locator(".log-line:visible")).not_to_have_count(1)

        pause = page.get_by_test_id("log-pause")
        await pause.click()
        await expect(pause).to_have_attribute("aria-pressed", "true")
        async with s.get(ls.url + "/v1/models", headers={"User-Agent": second}) as r:
            assert r.status == 200
        await expect(pause).to_have_text(re.compile(r"^Resume \(\d+ new\)$"))  # held back, counted
        await expect(line(second)).to_have_count(0)
        await pause.click()
        await expect(line(second)).to_have_count(1)

        await page.get_by_test_id("log-clear").click()
        await expect(output.locator(".log-line")).to_have_count(0)

        # A model's own output, preselected from the address, live as the model starts.
        await page.goto(ls.url + "/ui/logs?source=m")
        await expect(page.get_by_test_id("log-source")).to_have_value("m")
        async with s.post(ls.url + "/api/models/load/m") as r:
            assert r.status == 200
        await expect(line("responder m listening on")).to_have_count(1)
        await expect(output).not_to_contain_text("llama-swap listening on")  # only the model's lines
        await tabs.shot(page, "model-source")


# Activity and captures #####################################################################

async def test_a_capture_opens_from_the_activity_page_and_by_id(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "captureBuffer": 5,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/activity")
    await expect(page.get_by_test_id("connection-state")).to_have_text("connected")
    await expect(page.locator("p.empty", has_text="No requests recorded yet.")).to_be_visible()

    marker = f"capture-me-{uuid.uuid4().hex}"
    body = {"model": "m", "stream": True, "responder_chunks": 3, "messages": [{"role": "user", "content": marker}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer secret"}) as r:
            assert r.status == 200
            await r.read()
        assert await eventually(lambda: activity_rows(s, ls), 15)
        [row] = await activity_rows(s, ls)
    row_id = row["id"]

    # The row arrives without a reload (an `activity` event).
    activity_row = page.get_by_test_id(f"activity-row-{row_id}")
    await expect(activity_row).to_contain_text("/v1/chat/completions")
    await expect(activity_row).to_contain_text("200")
    await expect(page.get_by_test_id("summary-row-m").locator("td").nth(1)).to_have_text("1")  # one request
    await expect(page.get_by_test_id("speed-chart").or_(page.get_by_test_id("speed-chart-empty"))).to_be_visible()
    await tabs.shot(page, "activity")

    async def shows_the_capture() -> None:
        request, response = page.get_by_test_id("capture-request"), page.get_by_test_id("capture-response")
        await expect(request).to_contain_text("/v1/chat/completions")
        await expect(request).to_contain_text(marker)
        await expect(request).to_contain_text("[REDACTED]")  # the bearer key is not kept
        await expect(request).not_to_contain_text("secret")
        await expect(response).to_contain_text("text/event-stream")
        events = page.get_by_test_id("capture-events")
        await expect(events).to_contain_text("5 events")  # three chunks, the final one, [DONE]
        await expect(events).to_contain_text("tok2")

    await page.get_by_test_id(f"capture-link-{row_id}").click()
    await expect(page).to_have_url(f"{ls.url}/ui/captures/{row_id}")
    await shows_the_capture()
    await tabs.shot(page, "capture-from-activity", full_page=True)

    await page.get_by_test_id("nav-captures").click()
    await expect(page.get_by_test_id(f"capture-link-{row_id}")).to_be_visible()  # the recent list
    await page.get_by_test_id("capture-id").fill(str(row_id))
    await page.get_by_test_id("capture-open").click()
    await expect(page).to_have_url(f"{ls.url}/ui/captures/{row_id}")
    await shows_the_capture()

    await page.get_by_test_id("capture-id").fill("999")
    await page.get_by_test_id("capture-open").click()
    await expect(page.get_by_test_id("capture-error")).to_contain_text("capture not found")
    await tabs.shot(page, "capture-missing")


async def test_the_models_page_says_why_models_swapped_and_what_a_load_would_cost_and_activity_filters_by_key(
        start_llama_swap, upstreams, tabs):
    plain, agents = "sk-ui-plain-1", "sk-ui-agents-2"
    ls = start_llama_swap({"healthCheckTimeout": 30, "apiKeys": [plain, {"key": agents, "name": "agents"}],
                           "models": {"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")},
                                      "p": {"cmd": upstreams.cmd(name="p"), "protected": True}}})
    async with aiohttp.ClientSession() as s:
        for key, model in ((agents, "a"), (plain, "b")):
            async with s.post(ls.url + "/v1/chat/completions", json={"model": model},
                              headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
    page = await tabs.open(ls, "/ui/models", http_credentials={"username": "me", "password": plain})
    await expect(page.get_by_test_id("model-swap-a")).to_contain_text(
        re.compile(r"stopped at .* for b: one model at a time \(no groups configured\) "
                   r"\(key apiKeys\[0\], POST /v1/chat/completions from 127.0.0.1\)$"))
    await expect(page.get_by_test_id("model-swap-b")).to_contain_text("started at")
    await expect(page.get_by_test_id("model-protected-p")).to_have_text("protected")
    await page.get_by_test_id("load-a").hover()
    await expect(page.get_by_test_id("load-a")).to_have_attribute(
        "title", re.compile(r"^Load stops b \(one model at a time \(no groups configured\)\) · about \d\.\d s$"))
    await tabs.shot(page, "swap-notes-and-plan")

    await page.goto(ls.url + "/ui/activity")
    key_filter = page.get_by_test_id("activity-key")
    await expect(key_filter).to_be_visible()
    await expect(page.get_by_test_id("activity-table").locator("tbody tr")).to_have_count(2)
    await key_filter.select_option("agents")
    rows = page.get_by_test_id("activity-table").locator("tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("agents")
    await tabs.shot(page, "activity-by-key")


async def test_a_failed_start_reads_failed_with_its_reason_and_a_silent_start_says_no_output_yet(
        start_llama_swap, upstreams, tabs):
    quiet = f"sh -c 'sleep 3; exec {upstreams.cmd(name='quiet')}'"  # prints nothing for 3 s
    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {
        "broken": {"cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.3", name="broken")},
        "quiet": {"cmd": quiet}}})
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("load-broken").click()
    state = page.get_by_test_id("model-state-broken")
    await expect(state).to_have_text("failed", timeout=MODEL_START_MS)
    failure = page.get_by_test_id("model-failure-broken")
    await expect(failure).to_contain_text("upstream command exited prematurely")
    await expect(failure).to_contain_text("out of memory (simulated)")
    await tabs.shot(page, "failed")

    await page.get_by_test_id("load-quiet").click()
    await expect(page.get_by_test_id("model-state-quiet")).to_have_text("starting")
    await expect(page.get_by_test_id("model-tail-quiet")).to_have_text("no output yet")
    await tabs.shot(page, "no-output-yet")
    await expect(page.get_by_test_id("model-state-quiet")).to_have_text("ready", timeout=MODEL_START_MS)
    await expect(state).to_have_text("failed"), "until its next attempt"


async def test_the_playground_speed_counts_from_the_models_first_token_not_its_load(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 15, "sendLoadingState": True, "models": {
        "m": {"cmd": upstreams.cmd("--startup-delay", "3", "--chunks", "10", "--chunk-delay", "0.05", name="m")}}})
    page = await tabs.open(ls, "/ui/playground?model=m")
    await page.get_by_test_id("pg-input").fill("hello")
    await page.get_by_test_id("pg-send").click()
    meta = page.locator(".msg.assistant .meta").last
    await expect(meta).to_contain_text("10 tokens", timeout=MODEL_START_MS)
    speed = float(re.search(r"([\d.]+) t/s", await meta.text_content())[1])
    # 10 tokens over ~0.5 s once the model answers; counted from the loading text, over 3.5 s or more.
    assert speed > 5, await meta.text_content()


async def test_the_models_page_shows_groups_and_finds_and_orders_models(start_llama_swap, upstreams, tabs):
    models = {name: {"cmd": upstreams.cmd(name=name)} for name in ("zeta", "alpha", "coder")}
    models["coder"]["aliases"] = ["dev"]
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": models, "groups": {
        "pair": {"swap": True, "members": ["zeta", "alpha"]},
        "side": {"swap": False, "exclusive": False, "members": ["coder"]}}})
    page = await tabs.open(ls, "/ui/models")
    await expect(page.get_by_test_id("model-group-zeta")).to_have_text("group: pair")
    await expect(page.get_by_test_id("model-group-coder")).to_have_attribute(
        "title", "members run together; runs beside other groups")
    rows = page.locator("[data-testid^='model-row-']")
    await expect(rows).to_have_count(3)
    ids = [await r.get_attribute("data-testid") for r in await rows.all()]
    assert ids == ["model-row-alpha", "model-row-coder", "model-row-zeta"], "the server's order: by ID"
    await page.get_by_test_id("model-sort").select_option("state")
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "zeta"}) as r:
            assert r.status == 200
    await expect(rows.first).to_have_attribute("data-testid", "model-row-zeta")  # ready first
    await page.get_by_test_id("model-search").fill("dev")  # an alias finds its model
    await expect(page.get_by_test_id("model-row-coder")).to_be_visible()
    await expect(page.get_by_test_id("model-row-zeta")).to_be_hidden()
    await page.get_by_test_id("model-search").fill("nothing like it")
    await expect(page.get_by_text("No model matches.")).to_be_visible()
    await tabs.shot(page, "search")



# Performance and hardware ##################################################################

async def performance_requests_while(page: Page, seconds: float) -> int:
    """How many /api/performance requests the page makes in the next `seconds`."""
    seen = []

    def note(request) -> None:
        if "/api/performance" in request.url:
            seen.append(request.url)
    page.on("request", note)
    await asyncio.sleep(seconds)
    page.remove_listener("request", note)
    return len(seen)


async def test_the_performance_page_charts_the_samples_follows_them_and_changes_its_window(start_llama_swap, upstreams,
                                                                                            tabs):
    # Five seconds is the shortest interval the monitor takes (performance.every); its first sample comes one in.
    ls = start_llama_swap({"performance": {"every": "5s"}, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("nav-performance").click()
    await expect(page).to_have_url(f"{ls.url}/ui/performance")
    await expect(page.locator("main h1")).to_have_text("Performance")
    await expect(page.get_by_test_id("nav-performance")).to_have_attribute("aria-current", "page")
    await expect(page).to_have_title("Performance · llama-swap")
    for chart in ("cpu", "memory", "load", "network"):  # drawn by uPlot, on a canvas
        await expect(page.get_by_test_id(f"perf-chart-{chart}").locator("canvas")).to_have_count(1)
    await expect(page.get_by_test_id("perf-chart-cpu")).to_contain_text(re.compile(r"busy\s*\d+\.\d %"))
    await expect(page.get_by_test_id("perf-chart-memory")).to_contain_text(re.compile(r"used\s*\d+\.\d GiB"))
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/api/performance") as r:
            gpu_samples = (await r.json())["gpu_stats"]
    if gpu_samples:  # a machine with an NVIDIA GPU
        await expect(page.get_by_test_id("perf-chart-gpu-util").locator("canvas")).to_have_count(1)
    else:
        await expect(page.get_by_test_id("perf-gpu-note")).to_have_text("No GPU samples (no NVIDIA GPU or NVML).")

    # New samples arrive (each poll asks only for those after the newest it has): the newest time moves on.
    summary = page.get_by_test_id("perf-summary")
    await expect(summary).to_have_text(re.compile(r"^\d+ samples? in view"))
    await expect(summary).not_to_have_text(await summary.text_content(), timeout=20000)
    await tabs.shot(page, "light")

    window = page.get_by_test_id("perf-window")
    await window.select_option("1h")
    await expect(page).to_have_url(f"{ls.url}/ui/performance?window=1h")
    await expect(summary).to_have_text(re.compile(r"^\d+ samples? in view"))
    await expect(page.get_by_test_id("perf-chart-cpu").locator("canvas")).to_have_count(1)
    await window.select_option("all")
    await window.select_option("5m")
    await expect(page.get_by_test_id("perf-chart-memory").locator("canvas")).to_have_count(1)
    await tabs.shot(page, "window-changed")

    # Another page: the charts and the polling stop with it.
    await page.get_by_test_id("nav-hardware").click()
    await expect(page.locator("main h1")).to_have_text("Hardware")
    assert await page.locator(".uplot").count() == 0
    assert await performance_requests_while(page, 6) == 0

    # Dark, on a phone: the charts fit its width.
    phone = {"width": 390, "height": 844}
    dark = await tabs.open(ls, "/ui/performance?window=15m", color_scheme="dark", viewport=phone)
    await expect(dark.get_by_test_id("perf-window")).to_have_value("15m")
    await expect(dark.get_by_test_id("perf-chart-network").locator("canvas")).to_have_count(1)
    assert await dark.evaluate("document.documentElement.scrollWidth") <= 390
    await tabs.shot(dark, "dark-390px", full_page=True)


async def test_the_hardware_page_says_what_the_machine_is(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/api/hardware") as r:
            assert r.status == 200
            report = await r.json()
    page = await tabs.open(ls, "/ui/models")
    await page.get_by_test_id("nav-hardware").click()
    await expect(page).to_have_url(f"{ls.url}/ui/hardware")
    await expect(page.get_by_test_id("nav-hardware")).to_have_attribute("aria-current", "page")
    await expect(page).to_have_title("Hardware · llama-swap")

    cpu, memory = page.get_by_test_id("hw-cpu"), page.get_by_test_id("hw-memory")
    await expect(cpu).to_contain_text(f"Logical threads{report['cpu']['logical_thread_count']}")
    if report["cpu"]["model"]:
        await expect(cpu).to_contain_text(report["cpu"]["model"])
    await expect(memory).to_contain_text(re.compile(r"Capacity\s*\d+(\.\d)? [KMGT]iB"))
    await expect(page.get_by_test_id("hw-os")).to_contain_text(report["operating_system"]["kernel"])
    gpus = page.get_by_test_id("hw-gpus")
    if report["accelerators"]:
        await expect(gpus).to_contain_text(report["accelerators"][0]["model"])
    else:  # said in words, not left blank
        await expect(gpus).to_contain_text("No GPU found")
    await expect(page.get_by_test_id("hw-drivers")).to_contain_text("CUDA version")
    await tabs.shot(page, "light")

    dark = await tabs.open(ls, "/ui/hardware", color_scheme="dark", viewport={"width": 390, "height": 844})
    await expect(dark.get_by_test_id("hw-cpu")).to_contain_text("Physical cores")
    assert await dark.evaluate("document.documentElement.scrollWidth") <= 390
    await tabs.shot(dark, "dark-390px", full_page=True)
