"""Per-model and per-peer `timeouts` and what the upstream connection is spared."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from helpers import eventually, free_port
from llama_swap import Timeouts, keepalive_socket


async def post(session: aiohttp.ClientSession, url: str, payload: dict, **kwargs) -> tuple[int, dict]:
    async with session.post(url + "/v1/chat/completions", json=payload, **kwargs) as r:
        return r.status, await r.json(content_type=None)


async def test_a_model_that_sends_no_headers_within_response_header_gets_a_502(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd(name="m"), "timeouts": {"responseHeader": 1}}}})
    async with aiohttp.ClientSession() as s:
        status, reply = await post(s, ls.url, {"model": "m", "responder_sleep": 4})
        assert status == 502, reply
        assert reply["error"]["message"] == "upstream m unreachable: timeout awaiting response headers after 1s"
        # The limit is on the headers only: a stream that pauses longer between events is fine.
        async with s.post(ls.url + "/v1/chat/completions",
                          json={"model": "m", "stream": True, "responder_chunks": 2, "responder_delay": 1.5}) as r:
            assert r.status == 200
            assert b"data: [DONE]" in await r.read()


async def test_without_a_response_header_timeout_a_slow_model_is_waited_for(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        status, reply = await post(s, ls.url, {"model": "m", "responder_sleep": 2})
    assert status == 200, reply


async def test_a_peer_gets_its_own_response_header_timeout(in_process, upstreams, tmp_path):
    # The peer is a bare responder, started as the upstream of a second model group would be.
    port = free_port()
    ls = await in_process({
        "healthCheckTimeout": 15,
        "models": {"local": {"cmd": upstreams.cmd(name="local").replace("${PORT}", str(port)),
                             "proxy": f"http://127.0.0.1:{port}"}},
        "peers": {"slow": {"proxy": f"http://127.0.0.1:{port}", "models": ["remote"],
                           "timeouts": {"responseHeader": 1}}}})
    async with aiohttp.ClientSession() as s:
        assert (await post(s, ls.url, {"model": "local"}))[0] == 200  # starts the responder the peer points at
        status, reply = await post(s, ls.url, {"model": "slow/remote", "responder_sleep": 4})
        assert status == 502, reply
        assert reply["error"]["message"] == "peer proxy error: timeout awaiting response headers after 1s"
        status, reply = await post(s, ls.url, {"model": "remote"})
        assert status == 200 and reply["echo"]["model"] == "remote"


async def test_a_connect_timeout_of_zero_means_no_limit_and_idle_conn_zero_keeps_connections(in_process,
                                                                                             upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd(name="m"), "timeouts": {"connect": 0, "idleConn": 0, "keepalive": 0}}}})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, reply = await post(s, ls.url, {"model": "m"})
            assert status == 200, reply
    assert "timeouts" not in ls.output()  # acted on, so no "not acted on yet" warning


def test_keepalive_sockets_probe_at_the_configured_period():
    sock = keepalive_socket(7, (socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 1)))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
    finally:
        sock.close()
    sock = keepalive_socket(0, (socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 1)))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        sock.close()


def test_timeouts_are_values_that_compare_and_hash():
    assert Timeouts(connect=5) == Timeouts(connect=5) and hash(Timeouts(connect=5)) == hash(Timeouts(connect=5))
    assert Timeouts() != Timeouts(response_header=60)


async def test_an_expect_100_continue_is_answered_here_and_not_forwarded(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        status, reply = await post(s, ls.url, {"model": "m"}, expect100=True)
    assert status == 200, reply
    assert not any(k.lower() == "expect" for k in reply["echo"]["headers"])


@pytest.mark.parametrize("path, status", [("/upstream/m/health", 404), ("/upstream/m/", 200)])
async def test_an_upstream_that_refuses_a_websocket_upgrade_is_answered_with_what_it_said(in_process, upstreams,
                                                                                          path, status):
    # /health answers 404 here; the root page answers 200, which is no upgrade either: the client
    # gets each as the upstream sent it (the original passes a refusal through as it is).
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd("--health-status", "404", name="m"), "checkEndpoint": "none"}}})
    async with aiohttp.ClientSession() as s:
        async def listening() -> bool:  # "ready" at once without a health check: wait for the port
            async with s.get(ls.url + "/upstream/m/") as r:
                return r.status == 200
        assert await eventually(listening, 15)
        async with s.get(ls.url + path) as r:
            plain = (r.status, r.headers["Content-Type"], await r.read())
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(ls.url + path)
        assert refused.value.status == status
        async with s.get(ls.url + path, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                 "Sec-WebSocket-Version": "13",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
            refusal = (r.status, r.headers["Content-Type"], await r.read())
        assert refusal == plain and plain[0] == status
