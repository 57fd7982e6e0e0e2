"""Config reload, done better than the original (which stops every model): validate first, keep
what did not change, drain what did.

Each test runs a real llama-swap, edits its config file and reloads it through
POST /api/config/reload, SIGHUP or --watch-config, then checks pids and answers.
"""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import yaml

from helpers import chat, eventually, free_port_block, pid_alive, running

HEALTH_TIMEOUT = 15  # the minimum healthCheckTimeout: the graceful window of an eviction
TIMEOUT = aiohttp.ClientTimeout(total=90)


def config(models: dict[str, dict], **top) -> dict:
    """No `groups` key: every model is in the default group (exclusive, swap: one at a time)."""
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": models}


def write(ls, config: dict) -> None:
    ls.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


async def reload(session: aiohttp.ClientSession, ls) -> tuple[int, dict]:
    async with session.post(ls.url + "/api/config/reload") as r:
        return r.status, json.loads(await r.read())


async def upstream_pid(session: aiohttp.ClientSession, ls, model: str) -> int:
    async with session.get(f"{ls.url}/upstream/{model}/_responder/info") as r:
        return (await r.json())["pid"]


async def running_models(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in await running(session, ls)}


def base_config(upstreams, **models) -> dict:
    return {"startPort": free_port_block(), "healthCheckTimeout": 15,
            "groups": {"all": {"swap": False, "exclusive": False, "members": list(models)}},
            "models": {name: {"cmd": upstreams.cmd(*args, name=name)} for name, args in models.items()}}


async def test_an_unchanged_model_keeps_its_process_and_a_new_model_appears(in_process, upstreams):
    config = base_config(upstreams, a=())
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        pid = await upstream_pid(s, ls, "a")
        config["models"]["b"] = {"cmd": upstreams.cmd(name="b"), "aliases": ["bee"]}
        config["models"]["a"]["name"] = "A, renamed"  # not a launch setting
        config["groups"]["all"]["members"].append("b")
        write(ls, config)
        status, body = await reload(s, ls)
        assert status == 200, body
        assert body["models"]["added"] == ["b"] and body["models"]["kept"] == ["a"]
        assert await upstream_pid(s, ls, "a") == pid
        status, reply = await chat(s, ls, "bee")
        assert status == 200 and reply["model"] == "b"
        async with s.get(ls.url + "/v1/models") as r:
            names = {m["id"]: m.get("name") for m in (await r.json())["data"]}
        assert names == {"a": "A, renamed", "b": None}
        assert pid_alive(pid)


async def test_a_changed_model_restarts_on_next_use(in_process, upstreams):
    config = base_config(upstreams, a=())
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        old_pid = await upstream_pid(s, ls, "a")
        config["models"]["a"]["cmd"] = upstreams.cmd(name="a-v2")
        write(ls, config)
        status, body = await reload(s, ls)
        assert status == 200 and body["models"]["changed"] == ["a"], body
        status, reply = await chat(s, ls, "a")
        assert status == 200 and reply["model"] == "a-v2"
        assert not pid_alive(old_pid)


async def test_a_bad_edit_keeps_the_running_config_and_says_why(in_process, upstreams):
    config = base_config(upstreams, a=())
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        pid = await upstream_pid(s, ls, "a")
        config["models"]["a"]["ttl"] = "soon"
        write(ls, config)
        status, body = await reload(s, ls)
        assert status == 400
        assert body["error"]["code"] == "bad_request"
        assert "models.a.ttl" in body["error"]["message"] and "running config is kept" in body["error"]["message"]
        ls.config_path.write_text("models: [unclosed\n")
        assert (await reload(s, ls))[0] == 400
        status, reply = await chat(s, ls, "a")
        assert status == 200 and reply["model"] == "a"
        assert await upstream_pid(s, ls, "a") == pid
    assert "failed to reload config" in ls.output()


async def test_a_stream_running_across_a_reload_completes_and_the_next_request_gets_the_new_server(in_process,
                                                                                                   upstreams):
    config = base_config(upstreams, a=())
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        old_pid = await upstream_pid(s, ls, "a")
        body = {"model": "a", "stream": True, "responder_chunks": 12, "responder_delay": 0.15}
        async with s.post(ls.url + "/v1/chat/completions", json=body) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            config["models"]["a"]["cmd"] = upstreams.cmd(name="a-v2")
            write(ls, config)
            assert (await reload(s, ls))[0] == 200
            later = asyncio.create_task(chat(s, ls, "a"))  # waits for the stream to finish
            rest = await stream.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert rest.count(b"\"content\": \"tok") == 11  # every remaining chunk arrived
        status, reply = await asyncio.wait_for(later, 30)
        assert status == 200 and reply["model"] == "a-v2"
        assert not pid_alive(old_pid)


async def test_a_removed_model_finishes_its_requests_then_stops(in_process, upstreams):
    config = base_config(upstreams, a=(), b=())
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "b"))[0] == 200
        b_pid = await upstream_pid(s, ls, "b")
        del config["models"]["b"]
        config["groups"]["all"]["members"] = ["a"]
        write(ls, config)
        status, body = await reload(s, ls)
        assert status == 200 and body["models"]["removed"] == ["b"]
        status, reply = await chat(s, ls, "b")
        assert status == 404 and reply["error"]["message"].startswith('no router for requested model "b"')

        async def b_gone() -> bool:
            return not pid_alive(b_pid)

        async def nothing_running() -> bool:
            async with s.get(ls.url + "/running") as r:
                return (await r.json())["running"] == []

        assert await eventually(b_gone, 15)
        assert await eventually(nothing_running, 5)  # the stop is done once its output is read too


async def test_reload_removing_a_streaming_model_in_the_default_group_drains_it_then_serves_the_next(
        in_process, upstreams):
    cfg = config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}})
    ls = await in_process(cfg)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        body = {"model": "b", "stream": True, "responder_chunks": 30, "responder_delay": 0.1}
        async with s.post(ls.url + "/v1/chat/completions", json=body) as stream:
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            b_pid = upstreams.pids()[0]
            # Sent before the reload: it waits for b's stream, since a would evict b.
            queued = asyncio.create_task(chat(s, ls, "a"))
            await asyncio.sleep(0.3)
            assert not queued.done(), "a must wait while b is serving a stream"

            del cfg["models"]["b"]
            write(ls, cfg)
            status, changes = await reload(s, ls)
            assert status == 200, changes
            assert changes["models"]["removed"] == ["b"], changes

            later = asyncio.create_task(chat(s, ls, "a"))  # sent after the reload, while b still streams
            rest = await stream.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), rest[-300:]
        assert rest.count(b'"content": "tok') == 29, "every remaining chunk of b's stream must arrive"

        status, reply = await asyncio.wait_for(queued, 30)
        assert status == 200 and reply["model"] == "a", reply
        status, reply = await asyncio.wait_for(later, 30)
        assert status == 200 and reply["model"] == "a", reply

        assert not pid_alive(b_pid), "b must be stopped before a is started (one model at a time)"
        assert await running_models(s, ls) == {"a": "ready"}


async def test_unload_all_while_a_removed_model_is_still_draining_returns_200(in_process, upstreams):
    cfg = config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}})
    ls = await in_process(cfg)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        body = {"model": "b", "stream": True, "responder_chunks": 40, "responder_delay": 0.1}
        async with s.post(ls.url + "/v1/chat/completions", json=body) as stream:
            assert (await stream.content.readline()).startswith(b"data: ")
            b_pid = upstreams.pids()[0]
            del cfg["models"]["b"]
            write(ls, cfg)
            status, changes = await reload(s, ls)
            assert status == 200 and changes["models"]["removed"] == ["b"], changes

            async with s.post(ls.url + "/api/models/unload") as r:
                text = await r.text()
                assert r.status == 200, text
                assert json.loads(text) == {"msg": "ok"}
            try:  # the unload stops b at once: its stream is cut (or had just finished)
                await stream.read()
            except aiohttp.ClientError:
                pass
        assert await eventually(lambda: not pid_alive(b_pid), 10)
        assert await running(s, ls) == []
        status, reply = await chat(s, ls, "a")
        assert status == 200 and reply["model"] == "a", reply


async def test_sighup_reloads_the_config(start_llama_swap, upstreams):
    config = base_config(upstreams, a=())
    ls = start_llama_swap(config)
    config["models"]["c"] = {"cmd": upstreams.cmd(name="c")}
    config["groups"]["all"]["members"].append("c")
    write(ls, config)
    ls.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as s:
        async def c_listed() -> bool:
            async with s.get(ls.url + "/v1/models") as r:
                return "c" in {m["id"] for m in (await r.json())["data"]}

        assert await eventually(c_listed, 10)
    # Its stdout is written by a thread of its own, so the line may come a moment after the reload.
    assert ls.wait_for("received SIGHUP, reloading config", 10), ls.output()


async def test_watch_config_reloads_when_the_file_changes(start_llama_swap, upstreams):
    config = base_config(upstreams, a=())
    ls = start_llama_swap(config, "--watch-config")
    assert ls.wait_for("watching configuration for changes", 10), ls.output()
    await asyncio.sleep(2.5)  # past the watcher's first look at the file
    config["models"]["w"] = {"cmd": upstreams.cmd(name="w")}
    config["groups"]["all"]["members"].append("w")
    write(ls, config)
    async with aiohttp.ClientSession() as s:
        async def w_listed() -> bool:
            async with s.get(ls.url + "/v1/models") as r:
                return "w" in {m["id"] for m in (await r.json())["data"]}

        assert await eventually(w_listed, 15)


async def test_unknown_keys_are_logged_at_start_with_the_key_probably_meant(start_llama_swap, upstreams):
    config = base_config(upstreams, a=())
    config["models"]["a"]["ttll"] = 5
    ls = start_llama_swap(config)
    assert "models.a.ttll: unknown key, did you mean 'ttl'?" in ls.output()


async def test_a_new_model_that_sorts_first_moves_no_other_models_port(in_process, upstreams):
    # Ports are handed out in model-ID order at the first load; a model added later takes a free
    # port instead of shifting everyone's ${PORT} (which would restart every running model).
    config = base_config(upstreams, m=(), n=())
    start = config["startPort"]
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        for model in ("m", "n"):
            assert (await chat(s, ls, model))[0] == 200
        pids = {m: await upstream_pid(s, ls, m) for m in ("m", "n")}
        config["models"]["a"] = {"cmd": upstreams.cmd(name="a")}
        config["groups"]["all"]["members"].append("a")
        write(ls, config)
        status, body = await reload(s, ls)
        assert status == 200, body
        assert body["models"] == {"added": ["a"], "removed": [], "changed": [], "kept": ["m", "n"]}
        assert {m: await upstream_pid(s, ls, m) for m in ("m", "n")} == pids
        assert (await chat(s, ls, "a"))[0] == 200
        ports = {}
        for model in ("a", "m", "n"):
            async with s.get(f"{ls.url}/upstream/{model}/_responder/info") as r:
                ports[model] = (await r.json())["port"]
        assert ports == {"m": start, "n": start + 1, "a": start + 2}

        # A removed model's port is free for the next newcomer; the others stay where they are.
        del config["models"]["m"]
        config["models"]["b"] = {"cmd": upstreams.cmd(name="b")}
        config["groups"]["all"]["members"] = ["a", "n", "b"]
        write(ls, config)
        status, body = await reload(s, ls)
        assert body["models"] == {"added": ["b"], "removed": ["m"], "changed": [], "kept": ["a", "n"]}, body
        assert (await chat(s, ls, "b"))[0] == 200
        async with s.get(f"{ls.url}/upstream/b/_responder/info") as r:
            assert (await r.json())["port"] == start
