"""In-flight requests: what GET /api/inflight lists and what a cancel really stops."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from helpers import eventually, free_port


async def inflight(session: aiohttp.ClientSession, ls) -> list[dict]:
    async with session.get(ls.url + "/api/inflight") as r:
        assert r.status == 200
        return (await r.json())["requests"]


async def cancel(session: aiohttp.ClientSession, ls, request_id: str) -> tuple[int, dict]:
    async with session.post(ls.url + f"/api/inflight/{request_id}/cancel") as r:
        return r.status, await r.json()


async def responder_events(session: aiohttp.ClientSession, port: int) -> list[dict]:
    async with session.get(f"http://127.0.0.1:{port}/_responder/events") as r:
        return await r.json()


def one_model(upstreams, port: int, *args: str, **settings) -> dict:
    return {"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd(*args, name="m").replace("${PORT}", str(port)), "proxy": f"http://127.0.0.1:{port}",
        **settings}}}


async def test_cancelling_a_stream_cuts_it_and_reaches_the_upstream(in_process, upstreams):
    port = free_port()
    ls = await in_process(one_model(upstreams, port))
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={
                "model": "m", "stream": True, "responder_chunks": 200, "responder_delay": 0.1}) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # the stream is under way
            [entry] = await inflight(s, ls)
            assert entry["model"] == "m" and entry["req_path"] == "/v1/chat/completions"
            assert entry["resp_headers"]["Content-Type"] == "text/event-stream" and entry["resp_bytes"] > 0
            assert await cancel(s, ls, entry["id"]) == (200, {"msg": "ok"})
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended as if complete
                while await r.content.readany():
                    pass

        async def upstream_saw_the_disconnect() -> bool:
            return any(e["event"] == "client_disconnected" for e in await responder_events(s, port))
        assert await eventually(upstream_saw_the_disconnect, 10)
        assert await inflight(s, ls) == []
        assert (await cancel(s, ls, entry["id"]))[0] == 404
        # The model keeps serving: a cancel stops one request, not the server.
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 200
    assert f"cancelled in-flight request {entry['id']} (m POST /v1/chat/completions)" in ls.output()


async def test_cancelling_a_waiting_request_answers_it_with_a_499(in_process, upstreams):
    port = free_port()
    ls = await in_process(one_model(upstreams, port, "--startup-delay", "3"))
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(s.post(ls.url + "/v1/chat/completions", json={"model": "m"}))
        assert await eventually(lambda: inflight(s, ls), 10)
        [entry] = await inflight(s, ls)
        assert entry["resp_headers"] == {} and entry["resp_bytes"] == 0
        assert (await cancel(s, ls, entry["id"]))[0] == 200
        async with await waiting as r:
            assert r.status == 499
            body = await r.json()
        assert body["error"] == {"message": f"request {entry['id']} was cancelled", "type": "invalid_request_error",
                                 "param": None, "code": "request_cancelled"}
        assert await inflight(s, ls) == []


async def test_an_entry_shows_who_asked_what_without_credentials(in_process, upstreams):
    port = free_port()
    config = one_model(upstreams, port, "--startup-delay", "2")
    config["selectors"] = {"auto": {"strategy": "pin", "targets": ["m"]}}
    ls = await in_process(config)
    headers = {"Authorization": "Bearer secret-1", "x-api-key": "secret-2", "Cookie": "c=secret-3",
               "X-Forwarded-For": "203.0.113.9, 10.0.0.1", "x-custom-thing": "yes"}
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(s.post(ls.url + "/v/chat/completions?x=1", json={"model": "auto"},
                                             headers=headers))
        assert await eventually(lambda: inflight(s, ls), 10)
        [entry] = await inflight(s, ls)
        async with await waiting as r:
            assert r.status == 200
    assert entry["model"] == "m" and entry["req_path"] == "/chat/completions" and entry["method"] == "POST"
    assert entry["metadata"] == {"selector": "auto", "fifo_priority": "0"}
    assert entry["remote_ip"] == "203.0.113.9"
    sent = entry["req_headers"]
    assert sent["Authorization"] == sent["X-Api-Key"] == sent["Cookie"] == "[REDACTED]"
    assert sent["X-Custom-Thing"] == "yes" and "Host" not in sent
    assert "secret" not in json.dumps(entry)
    assert entry["timestamp"][:2] == "20" and entry["elapsed_ms"] >= 0
    assert "secret" not in ls.output()


async def test_upstream_requests_are_listed_only_when_they_call_a_model_route(in_process, upstreams):
    port = free_port()
    ls = await in_process(one_model(upstreams, port))
    async with aiohttp.ClientSession() as s:
        slow = {"responder_sleep": 2}
        model_route = asyncio.create_task(s.post(ls.url + "/upstream/m/v1/chat/completions", json=slow))
        other_route = asyncio.create_task(s.post(ls.url + "/upstream/m/slots", json=slow))
        assert await eventually(lambda: inflight(s, ls), 10)
        await asyncio.sleep(0.3)
        entries = await inflight(s, ls)
        for task in (model_route, other_route):
            async with await task as r:
                assert r.status == 200
    assert [(e["model"], e["req_path"]) for e in entries] == [("m", "/v1/chat/completions")]


async def test_peer_requests_are_listed_under_their_name(in_process, upstreams):
    port = free_port()
    config = one_model(upstreams, port)
    config["peers"] = {"p": {"proxy": f"http://127.0.0.1:{port}", "models": ["far"]}}
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 200  # the responder the peer points at now runs
        waiting = asyncio.create_task(s.post(ls.url + "/v1/chat/completions",
                                             json={"model": "p/far", "responder_sleep": 2}))
        assert await eventually(lambda: inflight(s, ls), 10)
        [entry] = await inflight(s, ls)
        assert (await cancel(s, ls, entry["id"]))[0] == 200
        async with await waiting as r:
            assert r.status == 499
    assert entry["model"] == "p/far"


async def test_the_inflight_api_is_for_admins(in_process, upstreams):
    port = free_port()
    config = one_model(upstreams, port)
    config.update({"apiKeys": ["user-key"], "adminKeys": ["admin-key"]})
    ls = await in_process(config)
    async with aiohttp.ClientSession() as s:
        for key, status in ((None, 401), ("user-key", 403), ("admin-key", 404)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with s.post(ls.url + "/api/inflight/99/cancel", headers=headers) as r:
                assert r.status == status


async def test_cancelling_during_the_loading_stream_cuts_it(in_process, upstreams):
    port = free_port()
    ls = await in_process(one_model(upstreams, port, "--startup-delay", "3", sendLoadingState=True))
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
            seen = b""
            while b"loading model: m" not in seen.replace(b'"}}]}\n\ndata: {"choices":[{"delta":{"reasoning_content":"',
                                                          b""):
                seen += await r.content.readuntil(b"\n\n")
            [entry] = await inflight(s, ls)
            assert entry["resp_headers"]["Content-Type"] == "text/event-stream"
            assert (await cancel(s, ls, entry["id"]))[0] == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                while await r.content.readany():
                    pass
        assert await inflight(s, ls) == []


async def test_an_entry_says_whether_it_is_queued_loading_or_answering(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {
        "a": {"cmd": upstreams.cmd("--startup-delay", "2", name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}})
    async with aiohttp.ClientSession() as s:
        to_a = asyncio.create_task(s.post(ls.url + "/v1/chat/completions", json={"model": "a", "responder_sleep": 1}))
        assert await eventually(lambda: ls.runtime.processes["a"].state == "starting", 5)
        to_b = asyncio.create_task(s.post(ls.url + "/v1/chat/completions", json={"model": "b"}))

        async def phases() -> dict[str, dict]:
            return {e["model"]: {k: e.get(k) for k in ("phase", "queue_position")} for e in await inflight(s, ls)}

        assert await eventually(lambda: phases_are(phases, {"a": {"phase": "loading", "queue_position": None},
                                                            "b": {"phase": "queued", "queue_position": 1}}), 5)
        assert await eventually(lambda: phases_are(phases, {"a": {"phase": "waiting", "queue_position": None},
                                                            "b": {"phase": "queued", "queue_position": 1}}), 10), \
            "a's model is up and its answer not begun (it sleeps 1 s); b still waits for a to finish"
        for task in (to_a, to_b):
            response = await task
            assert response.status == 200
            response.release()


async def phases_are(phases, expected: dict) -> bool:
    return await phases() == expected


async def test_watchers_hear_at_once_that_a_request_joined_the_queue(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {
        "a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}})
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "a"}) as r:
            assert r.status == 200
        # a streams for 4 s: nothing changes state meanwhile, so only joining the queue can tell b's phase.
        to_a = asyncio.create_task(s.post(ls.url + "/v1/chat/completions", json={
            "model": "a", "stream": True, "responder_chunks": 40, "responder_delay": 0.1}))
        async with s.get(ls.url + "/api/events") as events:
            assert await eventually(lambda: ls.runtime.scheduler.in_flight["a"] == 1, 5)
            to_b = asyncio.create_task(s.post(ls.url + "/v1/chat/completions", json={"model": "b"}))
            await asyncio.wait_for(told_queued(events, "b"), 3)
            assert ls.runtime.scheduler.in_flight["a"] == 1, "told while a still answers"
        for task in (to_a, to_b):
            response = await task
            assert response.status == 200
            await response.read()


async def told_queued(events: aiohttp.ClientResponse, model: str) -> None:
    """Until an in-flight event says a request for `model` is queued."""
    async for line in events.content:
        message = json.loads(line[5:]) if line.startswith(b"data:") else {}
        data = json.loads(message.get("data", "{}"))
        entry = data.get("request") or {} if isinstance(data, dict) else {}
        if message.get("type") == "inflight" and entry.get("model") == model and entry["phase"] == "queued":
            return
