"""What the UI's swap timeline and model pages read (issue 20): GET /api/timeline (the last
hour of each model's states, serving spans and queue depth, also pushed as `timeline` events)
and GET /api/models/<id> (one model's state, settings as loaded with secrets masked, what was
learnt of it, what a request would take now, its swaps).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from helpers import eventually
from llama_swap import Timeline, masked_command, masked_env

TIMEOUT = aiohttp.ClientTimeout(total=60)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- Timeline, by itself ---------------------------------------------------------------------

def test_serving_spans_open_and_close_with_the_first_and_last_request():
    clock, heard = Clock(), []
    timeline = Timeline(heard.append, clock)
    for serving in (1, 2, 3, 2, 1, 0, 0):
        timeline.counted("m", serving, 0)
        clock.now += 0.1
    spans = [(e["serving"], e["at"]) for e in timeline.entries if e["kind"] == "serving"]
    assert spans == [(True, 1_000_000.0), (False, 1_000_000.5)]
    assert heard == list(timeline.entries), "each entry is published as it is recorded"


def test_queue_depth_is_kept_per_second_with_its_most_and_its_last():
    clock, heard = Clock(), []
    timeline = Timeline(heard.append, clock)
    timeline.counted("m", 0, 0)  # nothing waits: nothing to record
    assert not timeline.entries
    for waiting in (1, 2, 5, 3):
        timeline.counted("m", 0, waiting)
    clock.now += 1
    timeline.counted("m", 1, 2)
    timeline.counted("m", 1, 0)
    clock.now += 1
    timeline.counted("m", 1, 0)  # still nothing waiting: no new second recorded
    queue = [(e["second"], e["most"], e["last"]) for e in timeline.entries if e["kind"] == "queue"]
    assert queue == [(1_000_000, 5, 3), (1_000_001, 2, 0)]
    # The drop to 0 within a second was told to watchers (the same entry again).
    assert heard[-1]["kind"] == "queue" and heard[-1]["last"] == 0


def test_the_answer_keeps_the_window_and_says_each_models_state_before_it():
    clock = Clock()
    timeline = Timeline(clock=clock)
    timeline.state("a", "starting")
    timeline.state("a", "ready")
    clock.now += 7200  # two hours later
    timeline.state("b", "starting")
    answer = timeline.since(0)
    assert [e["model"] for e in answer["entries"]] == ["b"]
    assert answer["before"] == {"a": {"state": "ready", "at": 1_000_000.0}}
    assert answer["from"] == clock.now - Timeline.WINDOW
    clock.now += 1
    timeline.state("b", "ready")
    newer = timeline.since(answer["now"])
    assert [(e["model"], e["state"]) for e in newer["entries"]] == [("b", "ready")]
    assert newer["before"]["b"]["state"] == "starting"


def test_the_timeline_is_bounded_however_busy_the_box_is():
    clock = Clock()
    timeline = Timeline(clock=clock)
    for i in range(Timeline.LIMIT + 500):
        timeline.counted("m", i % 2, 0)
        clock.now += 0.001
    assert len(timeline.entries) == Timeline.LIMIT


# -- secrets on the model page ---------------------------------------------------------------

def test_secrets_in_commands_and_env_are_masked_and_nothing_else():
    assert masked_command("llama-server --api-key sk-1 -m x.gguf --port 9") == \
        "llama-server --api-key [REDACTED] -m x.gguf --port 9"
    assert masked_command("HF_TOKEN=hf_x vllm serve m --hf-token=hf_y --no-auth --port 3") == \
        "HF_TOKEN=[REDACTED] vllm serve m --hf-token=[REDACTED] --no-auth --port 3"
    assert masked_command("x --monkey 3 --tokenizer t") == "x --monkey 3 --tokenizer t"
    assert masked_env(["CUDA_VISIBLE_DEVICES=0", "OPENAI_API_KEY=sk", "DB_PASSWORD=p", "MONKEY=1"]) == \
        ["CUDA_VISIBLE_DEVICES=0", "OPENAI_API_KEY=[REDACTED]", "DB_PASSWORD=[REDACTED]", "MONKEY=1"]


# -- end to end ------------------------------------------------------------------------------

def two_models(upstreams) -> dict:
    return {"healthCheckTimeout": 15,
            "models": {"a": {"cmd": upstreams.cmd(name="a"), "ttl": 300,
                             "env": ["HF_TOKEN=hf_secret_2", "CUDA_VISIBLE_DEVICES=0"], "aliases": ["alpha"]},
                       "b": {"cmd": upstreams.cmd(name="b")}}}


async def chat(s: aiohttp.ClientSession, ls, model: str, **extra) -> int:
    async with s.post(ls.url + "/v1/chat/completions", json={"model": model, **extra}) as r:
        await r.read()
        return r.status


async def timeline(s: aiohttp.ClientSession, ls, after: float = 0) -> dict:
    async with s.get(ls.url + "/api/timeline", params={"after": str(after)}) as r:
        assert r.status == 200
        return await r.json()


async def test_a_swap_draws_itself_on_the_timeline(start_llama_swap, upstreams):
    ls = start_llama_swap(two_models(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await chat(s, ls, "a") == 200
        # b waits for a's slow answer and then for its own load: its queue shows.
        slow = asyncio.create_task(chat(s, ls, "a", responder_chunks=20, responder_delay=0.1, stream=True))
        async def a_serves_again() -> bool:
            return sum(e["kind"] == "serving" and e["serving"] for e in (await timeline(s, ls))["entries"]) == 2
        assert await eventually(a_serves_again, 20)
        assert await asyncio.gather(chat(s, ls, "b"), chat(s, ls, "b"), slow) == [200, 200, 200]
        answer = await timeline(s, ls)
    states = [(e["model"], e["state"], e["reason"]) for e in answer["entries"] if e["kind"] == "state"]
    assert states[:2] == [("a", "starting", ""), ("a", "ready", "")]
    assert ("a", "stopping", "swapped out to make room") in states
    assert ("a", "stopped", "swapped out to make room") in states
    assert states.index(("a", "stopped", "swapped out to make room")) < states.index(("b", "ready", ""))
    serving = [(e["model"], e["serving"]) for e in answer["entries"] if e["kind"] == "serving"]
    assert serving[:2] == [("a", True), ("a", False)] and serving[-2:] == [("b", True), ("b", False)]
    queue = [e for e in answer["entries"] if e["kind"] == "queue" and e["model"] == "b"]
    assert queue and max(e["most"] for e in queue) == 2 and queue[-1]["last"] == 0
    assert answer["before"] == {}, "nothing happened before the first entry"
    later = await timeline_after(ls, answer["now"])
    assert later["entries"] == [] and later["before"]["b"]["state"] == "ready"


async def timeline_after(ls, after: float) -> dict:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        return await timeline(s, ls, after)


async def test_timeline_entries_are_pushed_on_the_event_stream(start_llama_swap, upstreams):
    ls = start_llama_swap(two_models(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(ls.url + "/api/events") as events:
        assert await chat(s, ls, "b") == 200
        kinds = []
        async for line in events.content:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message["type"] == "timeline":
                    entry = json.loads(message["data"])
                    kinds.append((entry["kind"], entry.get("state", entry.get("serving", entry.get("last")))))
                    if kinds[-1] == ("serving", False):
                        break
    # The request waits while b loads (queue 1), then is served; the wait's end is told too.
    assert kinds == [("queue", 1), ("state", "starting"), ("state", "ready"), ("serving", True), ("queue", 0),
                     ("serving", False)]


async def test_a_bad_after_is_refused(start_llama_swap, upstreams):
    ls = start_llama_swap(two_models(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/api/timeline?after=yesterday") as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "after must be a time in unix seconds"
        async with s.get(ls.url + "/api/timeline?after=nan") as r:
            assert r.status == 200


async def test_the_model_page_says_everything_known_of_a_model(start_llama_swap, upstreams):
    ls = start_llama_swap(two_models(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/api/models/a") as r:
            cold = await r.json()
        assert (cold["state"], cold["plan"]["action"], cold["learnt"]["load_times"]) == ("stopped", "start", [])
        assert await chat(s, ls, "alpha") == 200
        assert await chat(s, ls, "b") == 200
        async with s.get(ls.url + "/api/models/alpha") as r:  # an alias finds its model
            assert r.status == 200
            detail = await r.json()
            text = json.dumps(detail)
        async with s.get(ls.url + "/api/models/nope") as r:
            assert r.status == 404 and "nope" in (await r.json())["error"]["message"]
    assert (detail["id"], detail["state"], detail["state_reason"]) == ("a", "stopped", "swapped out to make room")
    assert detail["aliases"] == ["alpha"] and detail["settings"]["ttl"] == 300
    assert detail["settings"]["cmd"].endswith("--name a")
    assert detail["settings"]["env"] == ["HF_TOKEN=[REDACTED]", "CUDA_VISIBLE_DEVICES=0"]
    assert "hf_secret_2" not in text
    assert len(detail["learnt"]["load_times"]) == 1 and detail["learnt"]["usual_load_s"] > 0
    assert detail["plan"]["action"] == "swap" and [s["model"] for s in detail["plan"]["stops"]] == ["b"]
    assert [(w["model"], w["action"]) for w in detail["swaps"]] == [("a", "start"), ("b", "start")]
    assert detail["swaps"][1]["stops"][0]["model"] == "a"


async def test_a_scoped_key_sees_only_its_own_models_pages(start_llama_swap, upstreams):
    only_a = {"key": "sk-only-a", "name": "a-only", "models": ["a"]}
    ls = start_llama_swap({**two_models(upstreams), "apiKeys": [only_a]})
    headers = {"Authorization": "Bearer sk-only-a"}
    async with aiohttp.ClientSession(timeout=TIMEOUT, headers=headers) as s:
        async with s.get(ls.url + "/api/models/a") as r:
            assert r.status == 200
        async with s.get(ls.url + "/api/models/b") as r:
            assert r.status == 403
            assert (await r.json())["error"]["message"] == "API key 'a-only' may not use model 'b'"
