"""The playground's Rerank and Concurrency tabs in headless Chromium, against a real llama-swap
with responder upstreams (the responder answers /v1/rerank by word overlap with the query).

Needs the playwright package and Debian's Chromium at /usr/bin/chromium; without either the
module is skipped (tests/ui_harness.py). Screenshots land in test-output/ui/<test>-<step>.png.
"""

from __future__ import annotations

import base64
import json
import re

import aiohttp
import pytest

from helpers import eventually, free_port
from ui_harness import MODEL_START_MS, Page, activity_rows, expect, fixed_port_model, model_states, responder_events

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOCUMENTS = ["The cat sat on the mat", "a dog in the fog", "<b>mat</b> & cat", "nothing relevant"]
# "cat on the mat": the share of its four words each document holds.
RANKED = [("The cat sat on the mat", "1.000"), ("<b>mat</b> & cat", "0.500"), ("a dog in the fog", "0.250"),
          ("nothing relevant", "0.000")]


async def no_sideways_scroll(page: Page) -> None:
    width = await page.evaluate("window.innerWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width


async def fill_rerank(page: Page, query: str, documents: list[str]) -> None:
    await page.get_by_test_id("pg-rerank-query").fill(query)
    await page.get_by_test_id("pg-rerank-documents").fill("\n".join(documents))


# Rerank ####################################################################################

async def test_the_rerank_tab_shows_for_a_reranker_only_and_lists_the_documents_best_first(
        start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {
        "chat": {"cmd": upstreams.cmd(name="chat")},
        "ranker": {"cmd": upstreams.cmd(name="ranker"), "capabilities": {"reranker": True}}}})
    page = await tabs.open(ls, "/ui/playground?model=chat")
    model, tab = page.get_by_test_id("pg-model"), page.get_by_test_id("pg-tab-rerank")
    await expect(model).to_have_value("chat")
    await expect(page.get_by_test_id("pg-tab-concurrency")).to_be_visible()
    await expect(tab).to_be_hidden()

    await model.select_option("ranker")
    await expect(tab).to_be_visible()
    await tab.click()
    await expect(tab).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_test_id("pg-rerank-send")).to_be_visible()
    await fill_rerank(page, "cat on the mat", DOCUMENTS + ["", "   "])  # blank lines are no documents
    await page.get_by_test_id("pg-rerank-send").click()  # the model starts first

    results = page.get_by_test_id("pg-rerank-result")
    status = page.get_by_test_id("pg-rerank-status")
    await expect(results).to_have_count(4, timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("pg-rerank-doc")).to_have_text([text for text, _ in RANKED])
    await expect(page.get_by_test_id("pg-rerank-score")).to_have_text([score for _, score in RANKED])
    await expect(results.first).to_contain_text("document #0")
    await expect(status).to_have_text(re.compile(r"^4 results · [\d.]+ m?s$"))
    await expect(status).to_have_class("muted")
    # The document that looks like markup is shown as the text it is.
    assert await page.locator("[data-testid='pg-rerank-results'] b").count() == 0
    widths = await page.locator(".score-fill").evaluate_all("els => els.map((e) => e.style.width)")
    assert widths == ["100%", "50%", "25%", "0%"]
    await tabs.shot(page, "ranked")

    await page.get_by_test_id("pg-rerank-top-n").fill("2")
    await page.get_by_test_id("pg-rerank-send").click()
    await expect(status).to_have_text(re.compile(r"^2 results of 4 documents · "))
    await expect(page.get_by_test_id("pg-rerank-doc")).to_have_text([text for text, _ in RANKED[:2]])
    async with aiohttp.ClientSession() as s:
        assert await eventually(lambda: _two_rows(s, ls), 15)
        rows = await activity_rows(s, ls)
        last = max(rows, key=lambda row: row["id"])
        async with s.get(ls.url + f"/api/captures/{last['id']}") as r:
            sent = json.loads(base64.b64decode((await r.json())["req_body"]))
    assert sent == {"model": "ranker", "query": "cat on the mat", "documents": DOCUMENTS, "top_n": 2}

    # Back to a chat model: the tab goes, and the chat comes back.
    await model.select_option("chat")
    await expect(tab).to_be_hidden()
    await expect(page.get_by_test_id("pg-tab-chat")).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_test_id("pg-input")).to_be_visible()


async def _two_rows(session, ls) -> bool:
    return len(await activity_rows(session, ls)) >= 2


async def test_a_rerank_error_reads_as_a_sentence_on_a_phone_in_the_dark(start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {
        "ranker": {"cmd": upstreams.cmd(name="ranker"), "capabilities": {"reranker": True}},
        "broken": {"cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.3", name="broken"),
                   "capabilities": {"reranker": True}}}})
    page = await tabs.open(ls, "/ui/playground?model=ranker", viewport={"width": 375, "height": 800},
                           color_scheme="dark")
    await page.get_by_test_id("pg-tab-rerank").click()
    status = page.get_by_test_id("pg-rerank-status")

    await fill_rerank(page, "cat on the mat", [])
    await page.get_by_test_id("pg-rerank-send").click()
    await expect(status).to_have_text("Add at least one document, one per line.")
    await expect(status).to_have_class("error-text")

    await fill_rerank(page, "cat on the mat", DOCUMENTS)
    await page.get_by_test_id("pg-rerank-send").click()
    await expect(page.get_by_test_id("pg-rerank-result")).to_have_count(4, timeout=MODEL_START_MS)
    await no_sideways_scroll(page)
    await tabs.shot(page, "phone-dark-ranked", full_page=True)

    # A reranker that cannot start: llama-swap's error envelope, shown as its message.
    await page.get_by_test_id("pg-model").select_option("broken")
    await expect(page.get_by_test_id("pg-tab-rerank")).to_have_attribute("aria-selected", "true")
    await page.get_by_test_id("pg-rerank-send").click()
    await expect(status).to_have_class("error-text", timeout=MODEL_START_MS)
    await expect(status).to_contain_text("upstream command exited prematurely")
    await expect(status).to_contain_text("out of memory (simulated)")
    assert not (await status.text_content()).lstrip().startswith("{"), "the envelope itself, not its message"
    await expect(page.get_by_test_id("pg-rerank-result")).to_have_count(0)
    await expect(page.get_by_test_id("pg-rerank-send")).to_be_enabled()
    await no_sideways_scroll(page)
    await tabs.shot(page, "phone-dark-error")


# Concurrency ###############################################################################

# Which lane answers and which waits, once one does while the other has not begun: the
# requests race to the proxy, so either model may go first.
ONE_ANSWERS_ONE_WAITS = """() => {
    const lanes = [...document.querySelectorAll('article.lane')];
    const answering = lanes.filter((l) => l.dataset.phase === 'answering');
    const waiting = lanes.filter((l) => ['queued', 'loading', 'waiting'].includes(l.dataset.phase));
    if (lanes.length !== 2 || answering.length !== 1 || waiting.length !== 1) return null;
    const model = (lane) => lane.dataset.testid.replace('pg-lane-', '');
    return { answering: model(answering[0]), waiting: model(waiting[0]), phase: waiting[0].dataset.phase };
}"""


async def start_both(page: Page, prompt: str) -> None:
    await page.get_by_test_id("pg-tab-concurrency").click()
    await expect(page.get_by_test_id("pg-model")).to_be_hidden()  # the tab picks its own models
    for name in ("a", "b"):
        await page.get_by_test_id(f"pg-conc-model-{name}").check()
    await page.get_by_test_id("pg-conc-prompt").fill(prompt)
    await page.get_by_test_id("pg-conc-send").click()


async def test_two_models_of_one_swap_group_take_turns_and_each_lane_shows_its_steps_and_times(
        start_llama_swap, upstreams, tabs):
    slow = ("--startup-delay", "1", "--chunks", "20", "--chunk-delay", "0.1")
    ls = start_llama_swap({"healthCheckTimeout": 30, "groups": {"g": {"swap": True, "members": ["a", "b"]}},
                           "models": {name: {"cmd": upstreams.cmd(*slow, name=name)} for name in ("a", "b")}})
    page = await tabs.open(ls, "/ui/playground", color_scheme="dark")
    await expect(page.get_by_test_id("pg-model")).to_have_value("a")
    await page.get_by_test_id("pg-tab-concurrency").click()
    await expect(page.get_by_test_id("pg-conc-models")).to_contain_text("group g")
    await start_both(page, "count to twenty")
    await expect(page.get_by_test_id("pg-conc-send")).to_be_disabled()
    await expect(page.get_by_test_id("pg-conc-stop")).to_be_enabled()

    # One model answers while the other's request waits its turn in the queue.
    turn = await (await page.wait_for_function(ONE_ANSWERS_ONE_WAITS, timeout=MODEL_START_MS)).json_value()
    first, second = turn["answering"], turn["waiting"]
    await expect(page.get_by_test_id(f"pg-lane-phase-{second}")).to_have_text(re.compile(r"^queued #1$"))
    await expect(page.get_by_test_id(f"pg-lane-answer-{first}")).to_contain_text("tok0")
    await tabs.shot(page, "one-answers-one-queued")

    # Then the swap: the first is done, the second's model loads and it answers in turn.
    await expect(page.get_by_test_id(f"pg-lane-phase-{first}")).to_have_text("done")
    await expect(page.get_by_test_id(f"pg-lane-phase-{second}")).to_have_text("loading")
    await tabs.shot(page, "swapping")
    await expect(page.get_by_test_id(f"pg-lane-phase-{second}")).to_have_text("done", timeout=MODEL_START_MS)
    await expect(page.get_by_test_id("pg-conc-send")).to_be_enabled()
    await expect(page.get_by_test_id("pg-conc-stop")).to_be_disabled()
    for name in (first, second):
        await expect(page.get_by_test_id(f"pg-lane-answer-{name}")).to_have_text(
            " ".join(f"tok{i}" for i in range(20)) + " ")
        await expect(page.get_by_test_id(f"pg-lane-tokens-{name}")).to_have_text("20")
        await expect(page.get_by_test_id(f"pg-lane-speed-{name}")).to_have_text(re.compile(r"^[\d.]+ t/s$"))
        await expect(page.get_by_test_id(f"pg-lane-firstByte-{name}")).to_have_text(re.compile(r"^[\d.]+ m?s$"))
        await expect(page.get_by_test_id(f"pg-lane-total-{name}")).to_have_text(re.compile(r"^[\d.]+ m?s$"))
    await expect(page.get_by_test_id(f"pg-lane-phases-{first}")).to_have_text(
        re.compile(r"^(waiting \S+ \S+ → )?loading \S+ \S+ → answering \S+ \S+$"))
    await expect(page.get_by_test_id(f"pg-lane-phases-{second}")).to_have_text(
        re.compile(r"queued #1 \S+ \S+ → loading \S+ \S+ → answering \S+ \S+$"))
    await tabs.shot(page, "both-done")

    seconds = {}
    for name in (first, second):
        text = await page.get_by_test_id(f"pg-lane-firstByte-{name}").text_content()
        value, unit = text.split()
        seconds[name] = float(value) / (1000 if unit == "ms" else 1)
    # The second waited for the first's whole answer (20 chunks, 0.1 s apart) and its own load.
    assert seconds[second] > seconds[first] + 2, seconds
    async with aiohttp.ClientSession() as s:
        assert await model_states(s, ls) == {second: "ready"}  # swapped: the first is gone


async def test_stop_aborts_every_request_of_the_concurrency_tab_on_a_phone(start_llama_swap, upstreams, tabs):
    ports = {"a": free_port(), "b": free_port()}
    long = ("--chunks", "2000", "--chunk-delay", "0.05")
    ls = start_llama_swap({"healthCheckTimeout": 30, "groups": {"g": {"swap": True, "members": ["a", "b"]}},
                           "models": {n: fixed_port_model(upstreams, p, *long, name=n) for n, p in ports.items()}})
    page = await tabs.open(ls, "/ui/playground", viewport={"width": 375, "height": 800})
    await expect(page.get_by_test_id("pg-model")).to_have_value("a")
    await start_both(page, "count to two thousand")
    turn = await (await page.wait_for_function(ONE_ANSWERS_ONE_WAITS, timeout=MODEL_START_MS)).json_value()
    first, second = turn["answering"], turn["waiting"]
    await expect(page.get_by_test_id(f"pg-lane-answer-{first}")).to_contain_text("tok3")
    await no_sideways_scroll(page)
    await tabs.shot(page, "phone-running", full_page=True)

    await page.get_by_test_id("pg-conc-stop").click()
    for name in (first, second):
        await expect(page.get_by_test_id(f"pg-lane-phase-{name}")).to_have_text("stopped")
    await expect(page.get_by_test_id("pg-conc-send")).to_be_enabled()
    await expect(page.get_by_test_id("pg-conc-stop")).to_be_disabled()
    await expect(page.get_by_test_id(f"pg-lane-answer-{second}")).to_have_text("")
    await no_sideways_scroll(page)
    await tabs.shot(page, "phone-stopped", full_page=True)
    assert "tok1999" not in await page.get_by_test_id(f"pg-lane-answer-{first}").text_content()

    async with aiohttp.ClientSession() as s:
        async def upstream_saw_the_disconnect() -> bool:
            return any(e["event"] == "client_disconnected" for e in await responder_events(s, ports[first]))
        assert await eventually(upstream_saw_the_disconnect, 15)

        async def nothing_in_flight() -> bool:
            async with s.get(ls.url + "/api/inflight") as r:
                return (await r.json())["requests"] == []
        assert await eventually(nothing_in_flight, 15)
        assert second not in await model_states(s, ls)  # the queued request left before its model started


async def test_a_lane_shows_the_loading_text_apart_from_the_answer_and_times_the_answer_alone(
        start_llama_swap, upstreams, tabs):
    ls = start_llama_swap({"healthCheckTimeout": 30, "sendLoadingState": True, "models": {
        "m": {"cmd": upstreams.cmd("--startup-delay", "2", "--chunks", "10", "--chunk-delay", "0.05", name="m")}}})
    page = await tabs.open(ls, "/ui/playground")
    await page.get_by_test_id("pg-tab-concurrency").click()
    await page.get_by_test_id("pg-conc-model-m").check()
    await page.get_by_test_id("pg-conc-prompt").fill("hello")
    await page.get_by_test_id("pg-conc-send").click()

    phase, loading = page.get_by_test_id("pg-lane-phase-m"), page.get_by_test_id("pg-lane-loading-m")
    await expect(phase).to_have_text("loading")
    await expect(loading).to_contain_text("llama-swap loading model: m")
    await tabs.shot(page, "loading-text")
    await expect(phase).to_have_text("done", timeout=MODEL_START_MS)
    await expect(loading).to_contain_text("Done! (")
    await expect(page.get_by_test_id("pg-lane-reasoning-m")).to_be_hidden()
    await expect(page.get_by_test_id("pg-lane-answer-m")).to_have_text(" ".join(f"tok{i}" for i in range(10)) + " ")
    await expect(page.get_by_test_id("pg-lane-phases-m")).to_have_text(re.compile(r"loading \S+ \S+ → .*answering"))
    # 10 tokens 50 ms apart: the speed is the answer's, not spread over the two-second load.
    speed = float((await page.get_by_test_id("pg-lane-speed-m").text_content()).split()[0])
    assert speed > 8, speed
    await tabs.shot(page, "loaded-and-answered")

    # The tab, its settings and the last lanes are still there after a visit to another page.
    await page.get_by_test_id("nav-models").click()
    await expect(page.locator("main h1")).to_have_text("Models")
    await page.get_by_test_id("nav-playground").click()
    await expect(page.get_by_test_id("pg-tab-concurrency")).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_test_id("pg-conc-prompt")).to_have_value("hello")
    await expect(page.get_by_test_id("pg-conc-model-m")).to_be_checked()
    await expect(phase).to_have_text("done")
    await expect(page.get_by_test_id("pg-lane-tokens-m")).to_have_text("10")


async def test_leaving_the_page_stops_the_lanes_and_coming_back_shows_them_stopped(start_llama_swap, upstreams, tabs):
    port = free_port()
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {
        "m": fixed_port_model(upstreams, port, "--chunks", "2000", "--chunk-delay", "0.05", name="m")}})
    page = await tabs.open(ls, "/ui/playground")
    await page.get_by_test_id("pg-tab-concurrency").click()
    await page.get_by_test_id("pg-conc-model-m").check()
    await page.get_by_test_id("pg-conc-prompt").fill("count to two thousand")
    await page.get_by_test_id("pg-conc-send").click()
    await expect(page.get_by_test_id("pg-lane-answer-m")).to_contain_text("tok3", timeout=MODEL_START_MS)

    await page.get_by_test_id("nav-models").click()
    await expect(page.locator("main h1")).to_have_text("Models")
    await page.get_by_test_id("nav-playground").click()
    await expect(page.get_by_test_id("pg-lane-phase-m")).to_have_text("stopped")
    await expect(page.get_by_test_id("pg-conc-send")).to_be_enabled()
    await expect(page.get_by_test_id("pg-conc-stop")).to_be_disabled()
    await expect(page.get_by_test_id("pg-lane-answer-m")).to_contain_text("tok3")
    async with aiohttp.ClientSession() as s:
        async def upstream_saw_the_disconnect() -> bool:
            return any(e["event"] == "client_disconnected" for e in await responder_events(s, port))
        assert await eventually(upstream_saw_the_disconnect, 15)
