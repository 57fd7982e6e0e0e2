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

class Later:
    """What the timeline asks to run later, run when the test says."""

    def __init__(self):
        self.calls = []

    def __call__(self, delay, call):
        self.calls.append((delay, call))

    def run(self):
        calls, self.calls = self.calls, []
        for _, call in calls:
            call()


def test_requests_served_and_waiting_are_kept_per_second_with_the_most_and_the_last():
    clock, heard, later = Clock(1_000_000.25), [], Later()
    timeline = Timeline(heard.append, clock, later)
    timeline.counted("m", 0, 0)  # idle: nothing to record
    assert not timeline.entries
    for serving, waiting in ((0, 1), (0, 2), (1, 1), (2, 0), (1, 3), (0, 1)):
        timeline.counted("m", serving, waiting)
    assert len(timeline.entries) == 1, "one entry a second, however many requests"
    entry = timeline.entries[0]
    assert (entry["second"], entry["serving"], entry["waiting"]) == (1_000_000, [2, 0], [3, 1])
    assert [d for d, _ in later.calls] == [0.75], "sealed when its second is over"
    published = len(heard)
    later.run()
    assert heard[published:] == [entry] and entry["open"] is False
    clock.now += 1
    timeline.counted("m", 1, 0)
    timeline.counted("m", 0, 0)
    clock.now += 1
    later.run()
    timeline.counted("m", 0, 0)  # idle, and it ended its last second idle: nothing new
    assert [(e["serving"], e["waiting"]) for e in timeline.entries] == [([2, 0], [3, 1]), ([1, 0], [0, 0])]


def test_a_busy_model_adds_at_most_one_entry_a_second():
    clock, later = Clock(), Later()
    timeline = Timeline(clock=clock, later=later)
    for request in range(10_000):  # 1,000 requests a second, one after another, for ten seconds
        timeline.counted("m", 1, 0)
        timeline.counted("m", 0, 0)
        clock.now += 0.001
        if request % 1000 == 999:
            later.run()
    assert len(timeline.entries) == 10


def test_the_answer_keeps_the_window_and_says_each_models_state_before_it():
    clock = Clock()
    timeline = Timeline(clock=clock)
    timeline.state("a", "starting")
    timeline.state("a", "ready")
    clock.now += 7200  # two hours later
    timeline.state("b", "starting")
    answer = timeline.since(0)
    assert [e["model"] for e in answer["entries"]] == ["b"]
    assert answer["before"] == {"a": {"state": "ready", "at": 1_000_000.0, "reason": ""}}
    assert answer["started"] == 1_000_000.0
    assert answer["from"] == clock.now - Timeline.WINDOW
    clock.now += 1
    timeline.state("b", "ready")
    newer = timeline.since(answer["now"])
    assert [(e["model"], e["state"]) for e in newer["entries"]] == [("b", "ready")]
    assert newer["before"]["b"]["state"] == "starting"


def test_the_answer_says_what_a_model_served_before_its_first_entry():
    clock, later = Clock(), Later()
    timeline = Timeline(clock=clock, later=later)
    timeline.counted("m", 1, 2)  # a long request, still served an hour later
    later.run()
    clock.now += 4000
    assert timeline.since(0)["before"] == {"m": {"serving": 1, "waiting": 2}}


def test_the_timeline_is_bounded_however_busy_the_box_is():
    clock, later = Clock(), Later()
    timeline = Timeline(clock=clock, later=later)
    for i in range(Timeline.LIMIT + 500):
        timeline.counted(f"m{i % 2}", 1, 0)
        clock.now += 1
        later.run()
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
            async with s.get(ls.url + "/running") as r:
                return any(e["model"] == "a" and e["in_flight"] for e in (await r.json())["running"])
        assert await eventually(a_serves_again, 20)
        assert await asyncio.gather(chat(s, ls, "b"), chat(s, ls, "b"), slow) == [200, 200, 200]
        answer = await timeline(s, ls)
    states = [(e["model"], e["state"], e["reason"]) for e in answer["entries"] if e["kind"] == "state"]
    assert states[:2] == [("a", "starting", ""), ("a", "ready", "")]
    assert ("a", "stopping", "swapped out to make room") in states
    assert ("a", "stopped", "swapped out to make room") in states
    assert states.index(("a", "stopped", "swapped out to make room")) < states.index(("b", "ready", ""))
    loads = {m: [e for e in answer["entries"] if e["kind"] == "load" and e["model"] == m] for m in "ab"}
    assert max(e["serving"][0] for e in loads["a"]) == 1 and loads["a"][-1]["serving"][1] == 0
    assert max(e["waiting"][0] for e in loads["b"]) == 2, "both requests for b waited for its load"
    assert max(e["serving"][0] for e in loads["b"]) >= 1 and loads["b"][-1]["serving"][1] == 0
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
        kinds, served = [], False
        async for line in events.content:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message["type"] == "timeline":
                    entry = json.loads(message["data"])
                    kinds.append((entry["kind"], entry.get("state")))
                    served = served or entry["kind"] == "load" and entry["serving"][0] == 1
                    if served and entry["kind"] == "load" and not entry["open"] and entry["serving"][1] == 0:
                        break  # the second its serving ended in is over
    # The request waits while b loads, then is served: b's start between its load figures.
    assert kinds[0] == ("load", None) and ("state", "starting") in kinds and ("state", "ready") in kinds
    assert kinds[-1] == ("load", None)


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


async def test_a_failed_start_shows_its_output_with_keys_masked(start_llama_swap, upstreams):
    # The responder refuses a flag it does not know, and says so with the flag and its value.
    ls = start_llama_swap({"healthCheckTimeout": 15,
                           "models": {"a": {"cmd": upstreams.cmd("--api-key", "sk-abc123", name="a")}}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await chat(s, ls, "a") >= 500
        async with s.get(ls.url + "/api/models/a") as r:
            detail = await r.json()
        async with s.get(ls.url + "/v1/models") as r:
            listed = json.dumps(await r.json())
    assert "unrecognized arguments: --api-key [REDACTED]" in detail["failed"]["error"]
    assert "sk-abc123" not in json.dumps(detail) and "sk-abc123" not in listed
