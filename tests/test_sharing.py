"""Sharing a box: keys scoped to models, keys that may not cause a swap, protected models,
per-key concurrency (issue 19).

Every rule runs end to end against responders: the same two models (`a` and `b`, one at a time
as a config without groups has it) asked for with keys of each kind. A plain string in apiKeys
keeps today's meaning (every model, may swap); the keys themselves never show in the log.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from helpers import eventually, make_scheduler
from llama_swap import ApiKey, ConfigError, SwapRight, parse_config

PLAIN, AGENTS, QUEUE, RESIDENT, ONE_AT_A_TIME = ("sk-plain-0001", "sk-agents-0002", "sk-queue-0003",
                                                 "sk-resident-0004", "sk-single-0005")
TIMEOUT = aiohttp.ClientTimeout(total=60)
QUEUE_TIMEOUT_1500MS = {"routing": {"scheduler": {"settings": {"fifo": {"queueTimeoutMs": 1500}}}}}


def shared_config(upstreams, **top) -> dict:
    return {
        "healthCheckTimeout": 15,
        "models": {"a": {"cmd": upstreams.cmd(name="a"), "aliases": ["alpha"]},
                   "b": {"cmd": upstreams.cmd(name="b")},
                   "c": {"cmd": upstreams.cmd(name="c")}},
        "apiKeys": [PLAIN,
                    {"key": AGENTS, "name": "agents", "models": ["a", "c*"]},
                    {"key": QUEUE, "name": "background", "swap": "queue"},
                    {"key": RESIDENT, "name": "live", "swap": "resident"},
                    {"key": ONE_AT_A_TIME, "name": "single", "concurrency": 1}],
        **top,
    }


async def ask(s: aiohttp.ClientSession, ls, key: str, model: str, **extra) -> tuple[int, dict, dict]:
    async with s.post(ls.url + "/v1/chat/completions", json={"model": model, **extra},
                      headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, json.loads(await r.read()), dict(r.headers)


async def states(s: aiohttp.ClientSession, ls) -> dict[str, str]:
    async with s.get(ls.url + "/running", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
        assert r.status == 200
        return {e["model"]: e["state"] for e in (await r.json())["running"]}


def assert_no_key_in(text: str) -> None:
    for key in (PLAIN, AGENTS, QUEUE, RESIDENT, ONE_AT_A_TIME):
        assert key not in text


# -- config ----------------------------------------------------------------------------------

def test_key_entries_may_be_strings_or_mappings():
    config = parse_config("models:\n  coder:\n    cmd: x --port ${PORT}\napiKeys:\n  - plain\n"
                          "  - key: sk-agents\n    name: agents\n    models: [coder, 'qwen-*']\n    swap: queue\n"
                          "    priority: -1\n    concurrency: 4\nadminKeys:\n  - key: sk-admin\n    name: boss\n")
    plain, agents = config.api_keys
    assert (plain.key, plain.name, plain.swap, plain.restricted) == ("plain", "apiKeys[0]", SwapRight.EVICT, False)
    assert (agents.name, agents.models, agents.swap, agents.priority, agents.concurrency) == \
        ("agents", ("coder", "qwen-*"), SwapRight.QUEUE, -1, 4)
    assert agents.allows("qwen-7b") and agents.allows("coder") and not agents.allows("llama")
    assert config.admin_keys[0].name == "boss"
    assert "sk-agents" not in repr(agents), "a key never shows in a repr that may reach a log"


@pytest.mark.parametrize("keys, message", [
    ("[{name: x}]", "apiKeys[0].key: empty api key found in apiKeys"),
    ("[{key: k, swap: never}]", "apiKeys[0].swap: expected evict, queue or resident, got 'never'"),
    ("[{key: k, models: [codr]}]", "apiKeys[0].models: 'codr' is no model, alias, selector or peer model "
                                   "(did you mean 'coder'?)"),
    ("[{key: k, concurrency: -1}]", "apiKeys[0].concurrency: must be 0 (no limit) or more, got -1"),
    ("[{key: a, name: n}, {key: b, name: n}]", "apiKeys[1].name: 'n' is already the name of apiKeys[0]"),
    ("[a, {key: a, swap: queue}]", "apiKeys[1]: the same key as apiKeys[0], which makes its name and scope ambiguous"),
    ("[[a]]", "apiKeys[0]: expected a key (a string) or a mapping with `key`, got a list"),
])
def test_a_bad_key_entry_is_one_line_naming_it(keys, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"models:\n  coder:\n    cmd: x --port ${{PORT}}\napiKeys: {keys}\n")
    assert str(caught.value) == message


def test_plain_keys_given_twice_still_load_as_before():
    config = parse_config("models:\n  m:\n    cmd: x --port ${PORT}\napiKeys: [k, k]\nadminKeys: [k]\n")
    assert [k.key for k in config.api_keys] == ["k", "k"]


# -- models: a key sees and uses only its own ---------------------------------------------------

async def test_a_scoped_key_sees_and_uses_only_its_models(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await ask(s, ls, AGENTS, "alpha"))[0] == 200, "an alias of an allowed model is allowed"
        status, body, _ = await ask(s, ls, AGENTS, "b")
        assert status == 403, body
        assert body["error"]["message"] == "API key 'agents' may not use model 'b'"
        assert (await ask(s, ls, AGENTS, "c"))[0] == 200, "c* is a glob"
        async with s.get(ls.url + "/v1/models", headers={"Authorization": f"Bearer {AGENTS}"}) as r:
            assert sorted(m["id"] for m in (await r.json())["data"]) == ["a", "c"]
        async with s.get(ls.url + "/v1/models", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert sorted(m["id"] for m in (await r.json())["data"]) == ["a", "b", "c"]
        async with s.get(ls.url + "/upstream/b/health", headers={"Authorization": f"Bearer {AGENTS}"}) as r:
            assert r.status == 403
        async with s.post(ls.url + "/api/models/unload", headers={"Authorization": f"Bearer {AGENTS}"}) as r:
            assert r.status == 403, "a scoped key never changes what runs"
            assert "API key 'agents' is limited" in (await r.json())["error"]["message"]
        assert await states(s, ls) == {"c": "ready"}
        async with s.post(ls.url + "/api/models/unload", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert r.status == 200, "a plain key keeps its rights"
    assert_no_key_in(ls.output())


async def test_the_openai_sdk_with_a_scoped_key(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key=AGENTS, max_retries=0, timeout=60)
    try:
        assert sorted([m.id async for m in client.models.list()]) == ["a", "c"]
        reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "a"
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}])
        assert "may not use model 'b'" in str(caught.value)
    finally:
        await client.close()


# -- swap: evict, queue, resident -----------------------------------------------------------------

async def test_a_resident_key_is_served_only_by_a_ready_model_and_stops_nothing(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body, headers = await ask(s, ls, RESIDENT, "a")
        assert status == 503 and headers["Retry-After"].isdigit(), body
        assert body["error"]["message"] == "a is not loaded, and API key 'live' may only use models that are " \
                                           "(swap: resident)"
        assert await states(s, ls) == {}, "nothing was started for it"
        assert (await ask(s, ls, PLAIN, "a"))[0] == 200
        assert (await ask(s, ls, RESIDENT, "a"))[0] == 200
        assert (await ask(s, ls, RESIDENT, "b"))[0] == 503
        assert await states(s, ls) == {"a": "ready"}, "a resident request never swaps"


async def test_a_queue_key_waits_for_its_model_and_never_stops_one(in_process, upstreams):
    ls = await in_process(shared_config(upstreams, **QUEUE_TIMEOUT_1500MS))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await ask(s, ls, QUEUE, "a"))[0] == 200, "nothing runs: it may start a model"
        status, body, headers = await ask(s, ls, QUEUE, "b")
        assert status == 503 and headers["Retry-After"].isdigit(), body
        assert "was not ready for this request within 1.5s (queueTimeoutMs)" in body["error"]["message"]
        assert await states(s, ls) == {"a": "ready"}, "a queue request stops nothing"

        waiting = asyncio.create_task(ask(s, ls, QUEUE, "b"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert (await ask(s, ls, PLAIN, "b"))[0] == 200  # someone who may swap loads b ...
        assert (await waiting)[0] == 200  # ... and the waiting request is served by it
        assert await states(s, ls) == {"b": "ready"}


# -- protected models ------------------------------------------------------------------------------

async def test_a_protected_model_outlasts_a_swap_storm_and_stops_for_an_admin(in_process, upstreams):
    config = shared_config(upstreams, **QUEUE_TIMEOUT_1500MS)
    config["models"]["a"]["protected"] = True
    ls = await in_process(config)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await ask(s, ls, PLAIN, "a"))[0] == 200
        storm = await asyncio.gather(*(ask(s, ls, PLAIN, model) for model in ("b", "c") * 4))
        assert {status for status, _, _ in storm} == {503}, storm
        assert all(headers["Retry-After"].isdigit() for _, _, headers in storm)
        assert await states(s, ls) == {"a": "ready"}
        assert (await ask(s, ls, PLAIN, "a"))[0] == 200, "it keeps serving through the storm"
        async with s.get(ls.url + "/running", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            entry = (await r.json())["running"][0]
        assert entry["model"] == "a" and entry["protected"] is True
        async with s.get(ls.url + "/v1/models", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            listed = {m["id"]: m["meta"]["llamaswap"] for m in (await r.json())["data"]}
        assert listed["a"]["protected"] is True and "protected" not in listed["b"]
        async with s.post(ls.url + "/api/models/unload/a", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert r.status == 200
        assert (await ask(s, ls, PLAIN, "b"))[0] == 200
        assert await states(s, ls) == {"b": "ready"}


# -- concurrency and priority ---------------------------------------------------------------------

async def test_a_key_past_its_concurrency_gets_429(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        first = asyncio.create_task(ask(s, ls, ONE_AT_A_TIME, "a", responder_sleep=1.5))
        await asyncio.sleep(0.8)  # (a loads, then the answer takes 1.5 s)
        status, body, headers = await ask(s, ls, ONE_AT_A_TIME, "a")
        assert status == 429 and headers["Retry-After"] == "1", body
        assert body["error"]["message"] == "API key 'single' already has 1 requests in flight (its concurrency); " \
                                           "try again when one ends"
        assert (await ask(s, ls, PLAIN, "a"))[0] == 200, "other keys are not limited by it"
        assert (await first)[0] == 200
        assert (await ask(s, ls, ONE_AT_A_TIME, "a"))[0] == 200


def test_a_keys_priority_is_added_to_the_models():
    async def tickets() -> tuple[int, int, str]:
        scheduler, _processes, _events = make_scheduler("a", priority={"a": 3})
        key = ApiKey("k", "agents", priority=-5)
        ticket = scheduler.ticket("a", "POST /v1/chat/completions", key)
        return ticket.priority, scheduler.ticket("a").priority, ticket.key

    assert asyncio.run(tickets()) == (-2, 3, "agents")


# -- swaps that explain themselves: the log line, /api/swaps, the swap event, /api/plan -----------

async def get_json(s: aiohttp.ClientSession, ls, path: str) -> dict:
    async with s.get(ls.url + path, headers={"Authorization": f"Bearer {PLAIN}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_each_swap_is_one_line_and_a_record_with_its_reasons_key_and_expected_load(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/api/events", headers={"Authorization": f"Bearer {PLAIN}"}) as events:
            assert (await ask(s, ls, PLAIN, "a"))[0] == 200
            assert (await ask(s, ls, AGENTS, "c"))[0] == 200
            assert (await ask(s, ls, PLAIN, "a"))[0] == 200
            async with s.post(ls.url + "/api/models/unload", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
                assert r.status == 200
            seen = b""
            while seen.count(b'"type":"swap"') < 7:  # three swaps decided and done, one unload
                seen += await asyncio.wait_for(events.content.readany(), 10)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        swaps = (await get_json(s, ls, "/api/swaps"))["swaps"]
    assert [(w["kind"], w["model"], w["action"], w["key"], w["result"]) for w in swaps] == [
        ("swap", "a", "start", "apiKeys[0]", "ok"), ("swap", "c", "start", "agents", "ok"),
        ("swap", "a", "start", "apiKeys[0]", "ok"), ("unload", "", "stop", "", "ok")]
    assert swaps[1]["stops"] == [{"model": "a", "action": "stop", "why": "one model at a time (no groups configured)"}]
    assert swaps[1]["expected_s"] is None and swaps[2]["expected_s"] > 0, "a's first load is what the second expects"
    assert all(w["duration_s"] >= 0 for w in swaps[:3])
    assert swaps[3]["stops"] == [{"model": "a", "action": "stop", "why": "unloaded by an admin action"}]
    assert swaps[3]["request"].startswith("POST /api/models/unload from 127.0.0.1")
    output = ls.output()
    assert "<c> starting for POST /v1/chat/completions from 127.0.0.1 (key agents), stopping a to make room " \
           "(a: one model at a time (no groups configured))" in output
    expected = swaps[2]["expected_s"]
    assert "<a> starting for POST /v1/chat/completions from 127.0.0.1 (key apiKeys[0]), stopping c to make room " \
           f"(c: one model at a time (no groups configured)); a load takes about {expected:.1f}s" in output
    assert_no_key_in(output)
    assert_no_key_in(seen.decode())


async def test_the_plan_says_what_a_request_would_take_and_the_swap_then_does_it(in_process, upstreams):
    config = shared_config(upstreams)
    config["groups"] = {"pair": {"swap": True, "members": ["a", "b"]}, "side": {"swap": False, "exclusive": False,
                                                                               "members": ["c"]}}
    ls = await in_process(config)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        plan = await get_json(s, ls, "/api/plan?model=alpha")
        assert (plan["model"], plan["action"], plan["stops"], plan["expected_wait_s"]) == ("a", "start", [], None)
        for model in ("a", "b", "a"):
            assert (await ask(s, ls, PLAIN, model))[0] == 200
        plan = await get_json(s, ls, "/api/plan?model=b")
        assert plan["action"] == "swap" and plan["state"] == "stopped"
        assert plan["stops"] == [{"model": "a", "action": "stop", "why": "group pair runs one member at a time"}]
        assert plan["expected_wait_s"] > 0, "b has loaded before: its load time is known"
        assert (await get_json(s, ls, "/api/plan?model=a"))["action"] == "serve"
        assert (await get_json(s, ls, "/api/plan?model=c"))["action"] == "start", "c starts beside a"
        queued = await get_json(s, ls, "/api/plan?model=b&key=background")
        assert (queued["action"], queued["queue_position"]) == ("queue", 1)
        assert queued["reason"] == "API key 'background' may not stop models (swap: queue)"
        assert (await get_json(s, ls, "/api/plan?model=b&key=live"))["action"] == "refuse"

        assert (await ask(s, ls, PLAIN, "b"))[0] == 200
        done = (await get_json(s, ls, "/api/swaps"))["swaps"][-1]
        assert (done["model"], done["stops"]) == ("b", plan["stops"]), "the swap did what the plan said"
        async with s.get(ls.url + "/api/plan?model=nope", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert r.status == 404
        async with s.get(ls.url + "/api/plan?model=a&key=nobody", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert r.status == 400


# -- accounting per key ------------------------------------------------------------------------

async def test_activity_and_metrics_are_kept_per_key_after_a_mixed_workload(in_process, upstreams):
    ls = await in_process(shared_config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for key, model in ((PLAIN, "a"), (AGENTS, "c"), (AGENTS, "c"), (AGENTS, "a"), (PLAIN, "b"), (RESIDENT, "b")):
            assert (await ask(s, ls, key, model))[0] == 200, (key, model)

        async def recorded() -> bool:
            return (await get_json(s, ls, "/api/metrics/activity"))["total"] == 6

        assert await eventually(recorded, 10)
        rows = (await get_json(s, ls, "/api/metrics/activity?order=asc"))["data"]
        assert [(r["key"], r["model"]) for r in rows] == [
            ("apiKeys[0]", "a"), ("agents", "c"), ("agents", "c"), ("agents", "a"), ("apiKeys[0]", "b"), ("live", "b")]
        swapping = rows[3]["metadata"]
        assert (swapping["swap_stopped"], float(swapping["swap_seconds"]) > 0) == ("c", True), \
            "the request that swapped c for a says so, with the swap's duration"
        assert "swap_id" not in rows[2]["metadata"], "c was ready: nothing was swapped for it"
        only_agents = (await get_json(s, ls, "/api/metrics/activity?key=agents"))["data"]
        assert [r["id"] for r in only_agents] == [rows[3]["id"], rows[2]["id"], rows[1]["id"]]
        groups = (await get_json(s, ls, "/api/metrics/activity?group=key"))["groups"]
        assert [(g["key"], g["requests"], g["swaps"]) for g in groups] == [
            ("agents", 3, 2), ("apiKeys[0]", 2, 2), ("live", 1, 0)]
        assert groups[0]["output_tokens"] == 9 and groups[0]["input_tokens"] == 21
        async with s.get(ls.url + "/api/metrics/activity?group=colour",
                         headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            assert r.status == 400
        async with s.get(ls.url + "/metrics", headers={"Authorization": f"Bearer {PLAIN}"}) as r:
            metrics = await r.text()
    assert 'llamaswap_key_requests_total{key="agents"} 3' in metrics
    assert 'llamaswap_key_tokens_total{key="agents",kind="generated"} 9' in metrics
    assert 'llamaswap_key_swaps_total{key="agents"} 2' in metrics
    assert 'llamaswap_key_swaps_total{key="live"}' not in metrics
    assert 'llamaswap_key_wait_seconds_total{key="agents"}' in metrics
    assert_no_key_in(metrics)


def test_a_store_made_before_keys_gains_them_and_keeps_its_rows(tmp_path):
    import sqlite3

    from llama_swap import ActivityStore, Tokens

    path = str(tmp_path / "activity.db")
    store = ActivityStore(path, 1000)
    store.add(model="m", req_path="/v1/chat/completions", resp_content_type="application/json", resp_status_code=200,
              tokens=Tokens(), duration_ms=5)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE activity_key")  # as a store of an earlier version, or the original's, has it
    db.commit()
    db.close()
    store = ActivityStore(path, 1000)
    try:
        store.add(model="m", req_path="/v1/chat/completions", resp_content_type="application/json",
                  resp_status_code=200, tokens=Tokens(), duration_ms=5, key="agents")
        assert [r.get("key") for r in store.query({"order": ["asc"]})["data"]] == [None, "agents"]
        assert [r["id"] for r in store.query({"key": ["agents"]})["data"]] == [2]
    finally:
        store.close()
