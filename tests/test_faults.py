"""Faults a real deployment meets, survived: upstreams that crash mid-stream, never become
healthy or hang their health probe, ignore SIGTERM during a swap, a stranger already on a
model's port, and a client too slow for the stream it asked for.

Every test runs `python -m llama_swap` in front of real `llama_swap_responder.py` upstreams
(its per-request controls make them crash or flood on cue) and checks what a client, the
upstream and the operating system see afterwards; the last word is always that the next
request for the model is served. healthCheckTimeout is 15 s, the smallest there is (lower
values are raised to it), and it is also how long a swap waits for an evicted server to exit,
so the tests that must wait it out are the slow ones here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from helpers import assert_envelope, chat, eventually, free_port_block, pid_alive, running

HEALTH_TIMEOUT = 15
START_BOUND = 20.0  # seconds a cold responder may take to become ready on a slow machine
STOP_BOUND = 10.0  # a loose upper bound for things that should be prompt
MiB = 1024**2


# --------------------------------------------------------------------------- helpers


def config(models: dict[str, dict], **top) -> dict:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": models}


def sse_payloads(raw: bytes) -> list[str]:
    """The `data:` payloads of a complete event stream, in order."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: "):].decode() for e in events]


def content_of(payload: str) -> str:
    return json.loads(payload)["choices"][0]["delta"]["content"]


async def stream_request(session: aiohttp.ClientSession, ls, model: str, **controls) -> aiohttp.ClientResponse:
    return await session.post(ls.url + "/v1/chat/completions", json={"model": model, "stream": True, **controls})


async def gone_from_ready(session: aiohttp.ClientSession, ls, model: str) -> bool:
    return all(e["model"] != model or e["state"] != "ready" for e in await running(session, ls))


async def assert_restarted_and_served(session: aiohttp.ClientSession, ls, upstreams, model: str) -> None:
    """The crashed server is noticed as gone, and the next request starts a new one."""
    [crashed] = upstreams.pids()
    assert await eventually(lambda: gone_from_ready(session, ls, model), STOP_BOUND), "a crashed model is still ready"
    status, body = await asyncio.wait_for(chat(session, ls, model), START_BOUND)
    assert status == 200, body
    assert body["model"] == model
    pids = upstreams.pids()
    assert len(pids) == 2 and pids[0] == crashed, pids
    assert pid_alive(pids[1])


async def upstream_url(session: aiohttp.ClientSession, ls, model: str) -> str:
    return next(e["proxy"] for e in await running(session, ls) if e["model"] == model)


async def upstream_info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/_responder/info") as r:
        return await r.json()


async def upstream_events(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(url + "/_responder/events") as r:
        return [e["event"] for e in await r.json()]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


# --------------------------------------------------------------------------- crashes mid-stream


async def test_crash_between_events_ends_the_stream_with_an_error_event_then_the_model_restarts(
        in_process, upstreams):
    ls = await in_process(config({"crashy": {"cmd": upstreams.cmd(name="crashy")}}))
    async with aiohttp.ClientSession() as s:
        async with await stream_request(s, ls, "crashy", responder_crash_after=3) as r:
            assert r.status == 200
            # read() raises ClientPayloadError unless the chunked body ended properly.
            raw = await r.read()
        payloads = sse_payloads(raw)
        assert [content_of(p) for p in payloads[:3]] == ["tok0 ", "tok1 ", "tok2 "]
        assert len(payloads) == 4, payloads
        final = json.loads(payloads[3])
        assert final["error"]["type"] == "server_error"
        assert final["error"]["code"] == "upstream_disconnected"
        assert "crashy" in final["error"]["message"]

        await assert_restarted_and_served(s, ls, upstreams, "crashy")


async def test_openai_sdk_gets_the_chunks_then_an_api_error_when_the_upstream_crashes(in_process, upstreams):
    ls = await in_process(config({"crashy": {"cmd": upstreams.cmd(name="crashy")}}))
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="x", max_retries=0, timeout=60)
    received = []
    try:
        stream = await client.chat.completions.create(
            model="crashy", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"responder_crash_after": 3})
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    finally:
        await client.close()
    assert received == ["tok0 ", "tok1 ", "tok2 "]
    # APIConnectionError is an APIError too: a cut connection must not pass for the error event.
    assert not isinstance(caught.value, openai.APIConnectionError), repr(caught.value)
    assert caught.value.body["code"] == "upstream_disconnected", caught.value.body


async def test_crash_inside_an_event_cuts_the_transfer_then_the_model_restarts(in_process, upstreams):
    ls = await in_process(config({"crashy": {"cmd": upstreams.cmd(name="crashy")}}))
    async with aiohttp.ClientSession() as s:
        received = bytearray()
        async with await stream_request(s, ls, "crashy", responder_crash_after=2, responder_crash_partial=True) as r:
            assert r.status == 200
            # Half an event cannot be finished with an error event: the body must look cut.
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    received += chunk
        complete = bytes(received).split(b"\n\n")[:2]
        assert [content_of(e[len(b"data: "):].decode()) for e in complete] == ["tok0 ", "tok1 "]

        await assert_restarted_and_served(s, ls, upstreams, "crashy")


# --------------------------------------------------------------------------- upstreams that never become healthy


async def test_unhealthy_and_hanging_starts_fail_every_waiter_within_the_timeout_and_are_retried(
        in_process, upstreams):
    # One never answers 200, the other's probe never answers at all; in a non-swapping group
    # both start at once, so the 15 s timeout is waited out once for the two.
    ls = await in_process(config(
        {"sick": {"cmd": upstreams.cmd("--health-status", "500", name="sick")},
         "hung": {"cmd": upstreams.cmd("--health-hang", name="hung")}},
        groups={"both": {"swap": False, "members": ["sick", "hung"]}}))
    async with aiohttp.ClientSession() as s:
        began = time.monotonic()
        waiters = [chat(s, ls, "sick") for _ in range(5)] + [chat(s, ls, "hung") for _ in range(3)]
        replies = await asyncio.wait_for(asyncio.gather(*waiters), HEALTH_TIMEOUT + 60)
        took = time.monotonic() - began
        for status, body in replies:
            assert_envelope(status, body, "unspecific error: health check timed out")
        assert took < HEALTH_TIMEOUT + 20, f"a hanging probe held its requests for {took:.1f}s"
        assert len(upstreams.pids()) == 2, "the waiters of each model must share one start"
        assert await eventually(lambda: not upstreams.alive(), STOP_BOUND), "a timed-out start must kill its process"
        assert await running(s, ls) == []

        status, body = await asyncio.wait_for(chat(s, ls, "sick"), HEALTH_TIMEOUT + START_BOUND)
        assert_envelope(status, body, "unspecific error: health check timed out")
        assert len(upstreams.pids()) == 3, "the next request must start the model again"
        assert await eventually(lambda: not upstreams.alive(), STOP_BOUND)


# --------------------------------------------------------------------------- a swap past a stubborn server


async def test_a_swap_sigkills_an_evicted_group_that_ignores_sigterm(in_process, upstreams):
    # The wrapper exits on SIGTERM without passing it on; its grandchild ignores it anyway.
    stubborn = upstreams.cmd("--fork-grandchild", "--ignore-sigterm", name="stubborn")
    ls = await in_process(config({"stubborn": {"cmd": stubborn}, "b": {"cmd": upstreams.cmd(name="b")}}))
    async with aiohttp.ClientSession() as s:
        status, body = await asyncio.wait_for(chat(s, ls, "stubborn"), START_BOUND)
        assert status == 200, body
        stubborn_pids = upstreams.pids()
        assert len(stubborn_pids) == 2, f"expected the wrapper and its grandchild, got {stubborn_pids}"

        began = time.monotonic()
        status, body = await asyncio.wait_for(chat(s, ls, "b"), HEALTH_TIMEOUT + START_BOUND)
        took = time.monotonic() - began
        assert status == 200, body
        assert body["model"] == "b"
        # An eviction's graceful window is healthCheckTimeout: only SIGKILL ends it early.
        assert took >= HEALTH_TIMEOUT - 0.5, f"b was served after {took:.1f}s, before the window ran out"
        assert [pid for pid in stubborn_pids if pid_alive(pid)] == []
        assert [e["model"] for e in await running(s, ls)] == ["b"]
    assert "SIGKILL" in ls.output()


# --------------------------------------------------------------------------- a stranger on the model's port


@contextlib.asynccontextmanager
async def silent_stranger(port: int, seen: list[str]):
    # Never accept()ed: the kernel still completes the handshakes, and nobody ever answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        yield


@contextlib.asynccontextmanager
async def healthy_looking_stranger(port: int, seen: list[str]):
    async def answer(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("stranger", [silent_stranger, healthy_looking_stranger])
async def test_a_port_held_by_a_stranger_fails_the_request_and_starts_nothing(in_process, upstreams, stranger):
    port = free_port_block(1)
    ls = await in_process(config({"m": {"cmd": upstreams.cmd(name="m"), "proxy": f"http://127.0.0.1:{port}"}},
                                 startPort=port))
    seen: list[str] = []
    async with aiohttp.ClientSession() as s:
        async with stranger(port, seen):
            status, body = await asyncio.wait_for(chat(s, ls, "m"), HEALTH_TIMEOUT + START_BOUND)
            message = assert_envelope(status, body, "unspecific error: ")
            assert f"port {port}" in message and "already in use" in message, message
            assert upstreams.pids() == [], "a model server was started on a port someone else holds"
            assert "POST" not in seen, "the request was relayed to the stranger"
            assert await running(s, ls) == []

        status, body = await asyncio.wait_for(chat(s, ls, "m"), START_BOUND)
        assert status == 200, body
        assert body["model"] == "m"


# --------------------------------------------------------------------------- a slow client on a fast stream


async def open_slow_client(port: int) -> socket.socket:
    """A connection whose receive buffer is small, so the proxy's writes back up quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # must precede connect
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def read_head(sock: socket.socket) -> bytes:
    """Everything up to the end of the response headers, and perhaps a little more."""
    loop = asyncio.get_running_loop()
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await loop.sock_recv(sock, 4096)
        assert chunk, received
        received += chunk
    return received


async def settled(read_count, interval: float = 1.0, timeout: float = 30.0) -> int:
    """The value of an async counter once two readings `interval` apart agree."""
    previous, deadline = await read_count(), time.monotonic() + timeout
    while True:
        await asyncio.sleep(interval)
        current = await read_count()
        if current == previous:
            return current
        assert time.monotonic() < deadline, f"still growing after {timeout}s: {current}"
        previous = current


async def test_a_client_that_stops_reading_stalls_the_upstream_without_buffering(start_llama_swap, upstreams):
    total = 512 * MiB
    ls = start_llama_swap(config({"m": {"cmd": upstreams.cmd(name="m")}}))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        status, body = await asyncio.wait_for(chat(s, ls, "m"), START_BOUND)  # loaded, relay warmed up
        assert status == 200, body
        url = await upstream_url(s, ls, "m")
        rss_before = rss_bytes(ls.proc.pid)

        sock = await open_slow_client(ls.port)
        try:
            payload = json.dumps({"model": "m", "stream": True, "responder_bytes": total}).encode()
            await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: llama-swap\r\n"
                                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                    % (len(payload), payload))
            head = await asyncio.wait_for(read_head(sock), START_BOUND)
            assert head.startswith(b"HTTP/1.1 200"), head
            await loop.sock_recv(sock, 4096)

            async def streamed_bytes() -> int:
                return (await upstream_info(s, url))["streamed_bytes"]

            streamed = await settled(streamed_bytes)
            assert 0 < streamed < 64 * MiB, f"the upstream streamed {streamed} bytes to a client that stopped reading"
            grown = rss_bytes(ls.proc.pid) - rss_before
            assert grown < 64 * MiB, f"llama-swap grew by {grown / MiB:.0f} MiB holding a stalled stream"
        finally:
            sock.close()

        async def upstream_saw_disconnect() -> bool:
            return "client_disconnected" in await upstream_events(s, url)

        assert await eventually(upstream_saw_disconnect, STOP_BOUND), "the upstream never saw the client leave"
        status, body = await asyncio.wait_for(chat(s, ls, "m"), START_BOUND)
        assert status == 200, body
