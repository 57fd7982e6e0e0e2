"""Sleep instead of stop (`sleep: {sleep: POST /sleep?level=1, wake: POST /wake_up}`).

A model whose server can sleep (vLLM's /sleep and /wake_up) is put to sleep where it would be
stopped to make room or for its TTL: its process stays, its GPU memory is given back, and a
request for it wakes it instead of starting it cold. A sleep that fails stops it; a wake that
fails starts it anew. A sleeping model does not count as running for groups; the vram router
counts what it keeps asleep and stops sleeping models first when room is short. The responder's
/sleep and /wake_up stand in for vLLM's (with delays, failures and fake GPU memory), so every
rule runs end to end; its `request_while_asleep` event would show a request relayed to a
sleeping server.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import chat, eventually, free_port_block, running
from llama_swap import ConfigError, parse_config
from test_vram import GiB, fake_gpus, fake_processes, holder, vram_config

SLEEP_CALLS = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}
START_BOUND = 20.0  # seconds a cold responder may take to become ready on a slow machine


def sleeper(upstreams, name: str, *args: str, **keys) -> dict:
    return {"cmd": upstreams.cmd(*args, name=name), "sleep": SLEEP_CALLS, **keys}


def swap_group(models: dict) -> dict:
    return {"models": models, "groups": {"g": {"swap": True, "members": list(models)}}}


async def states(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in await running(session, ls)}


async def info(session: aiohttp.ClientSession, ls, model: str) -> dict:
    """The responder's own account (/_responder/info), asked directly at its port."""
    proxy = ls.runtime.processes[model].model.proxy
    async with session.get(proxy + "/_responder/info") as r:
        return await r.json()


async def served(session: aiohttp.ClientSession, ls, model: str) -> dict:
    status, body = await asyncio.wait_for(chat(session, ls, model), START_BOUND)
    assert status == 200, body
    assert body["model"] == model, body
    return body


async def metric(session: aiohttp.ClientSession, ls, name: str, **labels: str) -> float | None:
    async with session.get(ls.url + "/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# -- config ----------------------------------------------------------------------------------

def test_sleep_calls_are_read_as_method_and_path():
    config = parse_config("models:\n  m:\n    cmd: serve --port ${PORT}\n    sleep:\n"
                          "      sleep: POST /sleep?level=1\n      wake: /wake_up\n")
    sleep = config.models["m"].sleep
    assert (sleep.sleep.method, sleep.sleep.path) == ("POST", "/sleep?level=1")
    assert (sleep.wake.method, sleep.wake.path) == ("POST", "/wake_up"), "the method may be left out: POST"
    assert parse_config("models:\n  m:\n    cmd: serve --port ${PORT}\n").models["m"].sleep is None


@pytest.mark.parametrize("value, message", [
    ("true", 'models.m.sleep: expected a mapping with the keys sleep and wake'),
    ("{sleep: POST /sleep}", 'models.m.sleep.wake: missing: the call that does it, such as "POST /wake_up"'),
    ("{sleep: FETCH /sleep, wake: /wake_up}", "models.m.sleep.sleep: expected \"METHOD /path\""),
    ("{sleep: POST sleep, wake: /wake_up}", "models.m.sleep.sleep: expected \"METHOD /path\""),
    ("{sleep: [POST, /sleep], wake: /wake_up}", "models.m.sleep.sleep: expected a string"),
])
def test_a_bad_sleep_setting_is_one_line_naming_model_and_key(value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"models:\n  m:\n    cmd: serve --port ${{PORT}}\n    sleep: {value}\n")
    assert str(caught.value).startswith(message), caught.value
    assert "\n" not in str(caught.value)


# -- a swap puts the other model to sleep; a request wakes it ---------------------------------

async def test_a_swap_puts_the_other_model_to_sleep_and_a_request_wakes_it(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a"), "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        a_pid = (await info(s, ls, "a"))["pid"]
        await served(s, ls, "b")
        assert await states(s, ls) == {"a": "sleeping", "b": "ready"}
        assert (await info(s, ls, "a"))["asleep"] is True, "a's server was sent its sleep call"
        async with s.get(ls.url + "/v1/models") as r:
            listed = {m["id"]: m["status"]["value"] for m in (await r.json())["data"]}
        assert listed == {"a": "sleeping", "b": "loaded"}

        await served(s, ls, "a")
        assert await states(s, ls) == {"a": "ready", "b": "sleeping"}
        a_info = await info(s, ls, "a")
        assert a_info["pid"] == a_pid and a_info["wakes"] == 1 and a_info["requests"] == 2, a_info
        assert len(upstreams.pids()) == 2, "waking starts no new server"
        assert await metric(s, ls, "llamaswap_model_sleeps_total", model="a", reason="swap") == 1
        assert await metric(s, ls, "llamaswap_model_sleeps_total", model="b", reason="swap") == 1
        assert await metric(s, ls, "llamaswap_model_wakes_total", model="a", result="ready") == 1
        assert await metric(s, ls, "llamaswap_model_state", model="b", state="sleeping") == 1
        assert await metric(s, ls, "llamaswap_model_stops_total", model="a") is None, "nothing was stopped"
    output = ls.output()
    assert "<b> starting for POST /v1/chat/completions" in output and "putting a to sleep to make room" in output
    assert "<a> asleep (to make room)" in output and "<a> waking for POST /v1/chat/completions" in output
    assert "<a> awake, woken in" in output


async def test_requests_that_arrive_while_a_model_wakes_share_one_wake(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a", "--wake-delay", "1"),
                                      "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        await asyncio.gather(*(served(s, ls, "a") for _ in range(4)))
        a_info = await info(s, ls, "a")
        assert a_info["wakes"] == 1 and a_info["requests"] == 5, a_info
        async with s.get(ls.runtime.processes["a"].model.proxy + "/_responder/events") as r:
            assert "request_while_asleep" not in {e["event"] for e in await r.json()}


async def test_a_request_that_comes_while_its_model_falls_asleep_wakes_it_after(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a", "--sleep-delay", "1"),
                                      "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        to_b = asyncio.create_task(served(s, ls, "b"))
        assert await eventually(lambda: ls.runtime.processes["a"].state == "sleeping", 5)
        await served(s, ls, "a")  # waits for a's sleep, then b's start, then b to sleep and a to wake
        await to_b
        a_info = await info(s, ls, "a")
        assert (a_info["sleeps"], a_info["wakes"]) == (1, 1), a_info
        assert await states(s, ls) == {"a": "ready", "b": "sleeping"}


async def test_sleeping_models_do_not_count_as_running_for_groups(in_process, upstreams):
    ls = await in_process(swap_group({m: sleeper(upstreams, m) for m in ("a", "b", "c")}))
    async with aiohttp.ClientSession() as s:
        for model in ("a", "b", "c"):
            await served(s, ls, model)
        assert await states(s, ls) == {"a": "sleeping", "b": "sleeping", "c": "ready"}
        assert len(upstreams.alive()) == 3
        assert await metric(s, ls, "llamaswap_model_sleeps_total", model="a", reason="swap") == 1, \
            "a, asleep already, was left alone when c started"


async def test_a_model_without_sleep_beside_one_with_it_is_stopped_as_before(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a"), "b": {"cmd": upstreams.cmd(name="b")}}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "b")
        await served(s, ls, "a")
        assert await states(s, ls) == {"a": "ready"}
        await served(s, ls, "b")
        assert await states(s, ls) == {"a": "sleeping", "b": "ready"}
        assert await metric(s, ls, "llamaswap_model_stops_total", model="b", reason="swap") == 1


# -- when sleeping or waking fails ------------------------------------------------------------

async def test_a_sleep_that_fails_stops_the_model_instead(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a", "--sleep-status", "500"),
                                      "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        a_pid = (await info(s, ls, "a"))["pid"]
        await served(s, ls, "b")
        assert await states(s, ls) == {"b": "ready"}
        assert a_pid not in upstreams.alive()
        assert await metric(s, ls, "llamaswap_model_stops_total", model="a", reason="swap") == 1
    assert "<a> could not go to sleep (POST /sleep?level=1 answered 500" in ls.output()
    assert "stopping it instead" in ls.output()


async def test_a_sleep_call_slower_than_the_stop_it_replaces_stops_the_model(in_process, upstreams):
    models = {"a": sleeper(upstreams, "a", "--sleep-delay", "60"), "b": sleeper(upstreams, "b")}
    ls = await in_process({**swap_group(models), "healthCheckTimeout": 15})
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        status, body = await asyncio.wait_for(chat(s, ls, "b"), 15 + START_BOUND)
        assert status == 200, body
        assert await states(s, ls) == {"b": "ready"}
    assert "<a> could not go to sleep (POST /sleep?level=1 was not answered within 15s)" in ls.output()


async def test_a_wake_that_fails_starts_the_model_anew(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a", "--wake-status", "503"),
                                      "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        old_pid = (await info(s, ls, "a"))["pid"]
        await served(s, ls, "b")
        await served(s, ls, "a")
        assert (await info(s, ls, "a"))["pid"] != old_pid, "a new server answered"
        assert old_pid not in upstreams.alive()
        assert await states(s, ls) == {"a": "ready", "b": "sleeping"}
        assert await metric(s, ls, "llamaswap_model_wakes_total", model="a", result="failed") == 1
        assert await metric(s, ls, "llamaswap_model_starts_total", model="a", result="ready") == 2
    assert "<a> could not wake (POST /wake_up answered 503" in ls.output()


async def test_a_sleeping_server_that_dies_is_simply_stopped(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a"), "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        a_pid = (await info(s, ls, "a"))["pid"]
        await served(s, ls, "b")
        os.kill(a_pid, signal.SIGKILL)
        assert await eventually(lambda: ls.runtime.processes["a"].state == "stopped", 5)
        assert await states(s, ls) == {"b": "ready"}
        await served(s, ls, "a")  # a cold start; b goes to sleep
        assert await states(s, ls) == {"a": "ready", "b": "sleeping"}
    assert "<a> upstream process exited unexpectedly while asleep" in ls.output()


# -- TTL, unload, shutdown ----------------------------------------------------------------------

async def test_a_model_whose_ttl_passes_sleeps_and_wakes_for_the_next_request(in_process, upstreams):
    ls = await in_process({"models": {"a": sleeper(upstreams, "a", ttl=1)}})
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        assert await eventually(lambda: ls.runtime.processes["a"].asleep, 10)
        assert await metric(s, ls, "llamaswap_model_sleeps_total", model="a", reason="ttl") == 1
        await served(s, ls, "a")
        assert (await info(s, ls, "a"))["wakes"] == 1
    assert "<a> going to sleep, TTL of 1s reached" in ls.output()


async def test_the_load_api_wakes_a_sleeping_model(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a"), "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        async with s.post(ls.url + "/api/models/load/a") as r:
            assert r.status == 200, await r.text()
        assert await states(s, ls) == {"a": "ready", "b": "sleeping"}
        assert (await info(s, ls, "a"))["wakes"] == 1


async def test_unload_stops_sleeping_models_too(in_process, upstreams):
    ls = await in_process(swap_group({"a": sleeper(upstreams, "a"), "b": sleeper(upstreams, "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        async with s.post(ls.url + "/api/models/unload") as r:
            assert r.status == 200
        assert await states(s, ls) == {}
        assert upstreams.alive() == []
        assert await metric(s, ls, "llamaswap_model_stops_total", model="a", reason="unload") == 1


# -- the vram router: what a sleeping server keeps counts, sleeping models stop first --------------

def vram_sleeper(upstreams, gpus: Path, name: str, held: str, kept: str | None, hint: str) -> dict:
    args = ("--sleep-vram", kept) if kept else ()
    model = holder(upstreams, gpus, name, held, *args, hint=hint)
    if kept:
        model["sleep"] = SLEEP_CALLS
    return model


async def test_vram_router_counts_what_sleepers_keep_and_stops_them_first(in_process, upstreams, tmp_path,
                                                                          monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    ls = await in_process(vram_config({
        "a": vram_sleeper(upstreams, gpus, "a", "0:16GiB", "0:1GiB", "16GiB"),
        "b": vram_sleeper(upstreams, gpus, "b", "0:16GiB", "0:1GiB", "16GiB"),
        "c": vram_sleeper(upstreams, gpus, "c", "0:6GiB", None, "6GiB"),
        "d": vram_sleeper(upstreams, gpus, "d", "0:6GiB", None, "6GiB"),
    }))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")  # 16 + 16 > 24: a sleeps, keeping 1 GiB
        assert await states(s, ls) == {"a": "sleeping", "b": "ready"}
        a_pid = (await info(s, ls, "a"))["pid"]
        assert fake_processes(gpus)[str(a_pid)]["0"] == GiB

        async def keeps_shown() -> bool:
            return {e["model"]: e.get("vram") for e in await running(s, ls)}.get("a") == {"0": GiB}

        assert await eventually(keeps_shown, 15), await running(s, ls)
        await served(s, ls, "c")  # 1 + 16 + 6 of 24: fits beside both
        assert await states(s, ls) == {"a": "sleeping", "b": "ready", "c": "ready"}
        await served(s, ls, "d")  # 1 + 16 + 6 + 6 > 24: a stops first, then b (least recently used) sleeps
        assert await states(s, ls) == {"b": "sleeping", "c": "ready", "d": "ready"}
        assert a_pid not in upstreams.alive()
        assert await metric(s, ls, "llamaswap_model_stops_total", model="a", reason="swap") == 1
    assert "vram: model=d needs [0:6.0GiB] evict=[a] sleep=[b]" in ls.output()


async def test_sleep_added_by_a_reload_keeps_the_running_server(in_process, upstreams):
    config = {"startPort": free_port_block(),
              **swap_group({"a": {"cmd": upstreams.cmd(name="a")}, "b": sleeper(upstreams, "b")})}
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        config["models"]["a"]["sleep"] = SLEEP_CALLS  # not a launch setting
        ls.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        async with s.post(ls.url + "/api/config/reload") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["models"]["kept"] == ["a", "b"]
        await served(s, ls, "b")
        assert await states(s, ls) == {"a": "sleeping", "b": "ready"}
        assert len(upstreams.pids()) == 2, "a kept its server through the reload, then slept"


async def test_waking_waits_only_for_the_memory_a_sleeper_does_not_keep(in_process, upstreams, tmp_path,
                                                                         monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    ls = await in_process(vram_config({
        "a": vram_sleeper(upstreams, gpus, "a", "0:16GiB", "0:4GiB", "16GiB"),
        "b": vram_sleeper(upstreams, gpus, "b", "0:6GiB", None, "6GiB"),
        "c": vram_sleeper(upstreams, gpus, "c", "0:4GiB", None, "4GiB"),
    }, {"reserve": 0, "releaseWait": 10}))
    async with aiohttp.ClientSession() as s:
        for model in ("a", "c", "b"):  # 16 + 4 + 6 > 24: a sleeps, keeping 4 GiB
            await served(s, ls, model)
        assert await states(s, ls) == {"a": "sleeping", "b": "ready", "c": "ready"}

        async def keeps_shown() -> bool:
            return {e["model"]: e.get("vram") for e in await running(s, ls)}.get("a") == {"0": 4 * GiB}

        assert await eventually(keeps_shown, 15), await running(s, ls)
        await served(s, ls, "a")  # 16 + 6 + 4 > 24: c goes; a needs 12 GiB more, and 14 are free
        assert await states(s, ls) == {"a": "ready", "b": "ready"}
    assert "memory for a still not free" not in ls.output()
