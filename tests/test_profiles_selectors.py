"""Profiles and selectors through a real llama-swap."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from helpers import chat


async def put_profile(session: aiohttp.ClientSession, ls, body) -> tuple[int, dict]:
    async with session.put(ls.url + "/api/profiles/active", data=json.dumps(body)) as r:
        return r.status, json.loads(await r.read())


def side_by_side(upstreams, *names: str, **top) -> dict:
    """Models that may all run at once (one group, no swapping)."""
    return {"healthCheckTimeout": 15, **top,
            "groups": {"all": {"swap": False, "exclusive": False, "members": list(names)}},
            "models": {n: {"cmd": upstreams.cmd(name=n)} for n in names}}


async def test_profile_pins_route_a_name_to_another_model_while_active(in_process, upstreams):
    config = side_by_side(upstreams, "a", "b", profiles={
        "coding": {"description": "code helpers", "pins": {"public": "b", "off": None}}})
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/api/profiles") as r:
            assert await r.json() == {"active": None, "profiles": [
                {"id": "coding", "description": "code helpers", "pins": {"public": "b", "off": ""}}]}
        status, body = await chat(s, ls, "public")
        assert status == 404 and body["error"]["message"].startswith('no router for requested model "public"')

        assert await put_profile(s, ls, {"name": "coding"}) == (200, {"active": "coding"})
        status, body = await chat(s, ls, "public")
        assert status == 200 and body["model"] == "b"
        assert json.loads(body["echo"]["body"])["model"] == "b"  # the upstream sees the pinned model
        status, body = await chat(s, ls, "off")
        assert status == 404 and body["error"]["message"] == "no model id could be identified"
        async with s.get(ls.url + "/v1/models") as r:
            records = {m["id"]: m for m in (await r.json())["data"]}
        assert records["public"]["meta"] == {"llamaswap": {"type": "profile"}}
        async with s.get(ls.url + "/upstream/public/_responder/info") as r:
            assert (await r.json())["name"] == "b"

        assert await put_profile(s, ls, {"name": None}) == (200, {"active": None})
        assert (await chat(s, ls, "public"))[0] == 404
    assert 'active profile changed to "coding"' in ls.output()


async def test_profile_requests_that_are_wrong_get_clear_errors(in_process, upstreams):
    config = side_by_side(upstreams, "a", profiles={"p": {"pins": {"x": "a"}}})
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        for body, status, message in [
            ([1, 2], 400, "invalid profile request"),
            ({}, 400, "profile name is required"),
            ({"name": 5}, 400, "profile name must be a string or null"),
            ({"name": "nope"}, 404, 'profile "nope" not found'),
        ]:
            got_status, got = await put_profile(s, ls, body)
            assert (got_status, got["error"]["message"]) == (status, message)
        async with s.get(ls.url + "/api/profiles") as r:
            assert (await r.json())["active"] is None


async def test_pin_and_warm_selectors_pick_their_target(in_process, upstreams):
    config = side_by_side(upstreams, "a", "b", selectors={
        "pinned": {"strategy": "pin", "targets": ["b", "a"]},
        "warmest": {"strategy": "warm", "targets": ["a", "b"]},
    })
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "pinned")
        assert status == 200 and body["model"] == "b"
        assert json.loads(body["echo"]["body"])["model"] == "b"
        status, body = await chat(s, ls, "warmest")  # b is ready, a is cold: the warm one wins
        assert status == 200 and body["model"] == "b"
        async with s.post(ls.url + "/api/models/unload") as r:
            assert r.status == 200
        status, body = await chat(s, ls, "warmest")  # nothing ready: the first target
        assert status == 200 and body["model"] == "a"
        async with s.get(ls.url + "/v1/models") as r:
            records = {m["id"]: m for m in (await r.json())["data"]}
        assert records["warmest"]["meta"]["llamaswap"] == {"type": "selector", "strategy": "warm",
                                                           "targets": ["a", "b"]}
        assert records["warmest"]["status"] == {"value": "loaded"}


async def test_spillover_sends_concurrent_requests_to_the_next_target(in_process, upstreams):
    config = side_by_side(upstreams, "a", "b", selectors={
        "pool": {"strategy": "spillover", "targets": ["a", "b"], "settings": {"spillover": 1}}})
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200  # a is warm, b is cold
        first = asyncio.create_task(chat(s, ls, "pool", responder_sleep=2.0))
        await asyncio.sleep(0.5)  # a now has one request: full at spillover 1
        second = asyncio.create_task(chat(s, ls, "pool"))
        results = await asyncio.gather(first, second)
    assert [status for status, _ in results] == [200, 200]
    assert [body["model"] for _, body in results] == ["a", "b"]
