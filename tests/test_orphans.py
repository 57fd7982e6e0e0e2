"""No orphans even when llama-swap itself is killed: PR_SET_PDEATHSIG takes its direct children
with it, and the record of process groups lets the next start stop whatever is left (Linux)."""

from __future__ import annotations

import os
import signal
import sys

import aiohttp
import pytest

from conftest import LlamaSwap, chat, pid_alive, wait_until
from llama_swap import group_record_path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def killed(server: LlamaSwap) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


async def test_a_model_server_dies_with_a_killed_llama_swap(tmp_path, upstreams):
    server = LlamaSwap(tmp_path, {"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    try:
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, server, "m"))[0] == 200
        [upstream] = upstreams.alive()
    finally:
        killed(server)  # no chance to stop anything
    assert wait_until(lambda: not pid_alive(upstream), 10), "the model server outlived llama-swap"


async def test_the_next_start_stops_what_a_killed_run_left(tmp_path, upstreams):
    # The server forks a grandchild and waits for it; PR_SET_PDEATHSIG reaches only the server.
    config = {"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd("--fork-grandchild", name="m")}}}
    first = LlamaSwap(tmp_path, config)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, first, "m"))[0] == 200
    finally:
        killed(first)
    assert wait_until(lambda: len(upstreams.alive()) == 1, 10), upstreams.alive()
    [grandchild] = upstreams.alive()

    second = LlamaSwap(tmp_path, config, ("--listen", f"127.0.0.1:{first.port}"))  # same port: same record
    second.port, second.url = first.port, first.url
    try:
        assert wait_until(lambda: not pid_alive(grandchild), 10), "the leftover was not stopped"
        assert "left running by a llama-swap that was killed" in second.output()
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, second, "m"))[0] == 200  # and the model starts again, on a free port
    finally:
        assert second.stop() == 0
    assert not os.path.exists(group_record_path(first.port)), "a clean exit must leave no record behind"
