"""No orphans even when llama-swap itself is killed: PR_SET_PDEATHSIG takes its direct children
with it, a watcher process stops the rest of their process groups within seconds, and the record
of process groups lets the next start on the same address stop whatever is still left (Linux).
And a second start on an address in use touches nothing of the first one's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from helpers import PY, LlamaSwap, chat, pid_alive, wait_until
from llama_swap import group_record_path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def killed(server: LlamaSwap) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def watchers_of(pid: int) -> list[int]:
    """The watcher processes a llama-swap started (children whose command line names them)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid and b"llama-swap-watcher" in cmdline:
            found.append(int(entry))
    return found


async def test_a_model_server_dies_with_a_killed_llama_swap(tmp_path, upstreams):
    server = LlamaSwap(tmp_path, {"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    try:
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, server, "m"))[0] == 200
        [upstream] = upstreams.alive()
    finally:
        killed(server)  # no chance to stop anything
    assert wait_until(lambda: not pid_alive(upstream), 10), "the model server outlived llama-swap"


async def test_the_next_start_on_the_address_stops_what_a_killed_run_left(tmp_path, upstreams):
    # The server forks a grandchild and waits for it; PR_SET_PDEATHSIG reaches only the server,
    # and here the watcher dies too (the OOM killer took both, say).
    config = {"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd("--fork-grandchild", name="m")}}}
    first = LlamaSwap(tmp_path, config)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, first, "m"))[0] == 200
        for watcher in watchers_of(first.proc.pid):
            os.kill(watcher, signal.SIGKILL)
    finally:
        killed(first)
    assert wait_until(lambda: len(upstreams.alive()) == 1, 10), upstreams.alive()
    [grandchild] = upstreams.alive()

    # Another address on the same port is another record: its start leaves them alone.
    (tmp_path / "other").mkdir()
    other = LlamaSwap(tmp_path / "other", config, ("--listen", f"127.0.0.2:{first.port}"))
    try:
        assert pid_alive(grandchild), "a start on another address stopped this one's leftovers"
    finally:
        assert other.stop() == 0

    second = LlamaSwap(tmp_path, config, ("--listen", f"127.0.0.1:{first.port}"))  # same address: same record
    second.port, second.url = first.port, first.url
    try:
        assert wait_until(lambda: not pid_alive(grandchild), 10), "the leftover was not stopped"
        assert "left running by a llama-swap that was killed" in second.output()
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, second, "m"))[0] == 200  # and the model starts again, on a free port
    finally:
        assert second.stop() == 0
    assert not os.path.exists(group_record_path("127.0.0.1", first.port)), "a clean exit must leave no record behind"


@pytest.mark.parametrize("wrapper", ["fork", "sh"])
async def test_a_killed_llama_swap_takes_a_wrapped_servers_grandchild_within_seconds(tmp_path, upstreams, wrapper):
    # Without `exec`, the wrapper (a script, `sh -c`, docker's client) is the direct child and the
    # real server a grandchild that PR_SET_PDEATHSIG never reaches.
    if wrapper == "fork":
        cmd = upstreams.cmd("--fork-grandchild", name="m")
    else:
        cmd = f"sh -c '{upstreams.cmd(name='m')}; true'"
    server = LlamaSwap(tmp_path, {"healthCheckTimeout": 15, "models": {"m": {"cmd": cmd}}})
    try:
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, server, "m"))[0] == 200
        servers = upstreams.alive()  # the real one, and the wrapper where it is a responder too
        assert len(watchers_of(server.proc.pid)) == 1
    finally:
        killed(server)  # nothing else starts on this address afterwards
    assert wait_until(lambda: not upstreams.alive(), 5), f"{servers} outlived llama-swap by more than 5 s"


async def test_a_clean_exit_ends_its_watcher(tmp_path, upstreams):
    server = LlamaSwap(tmp_path, {"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    try:
        [watcher] = watchers_of(server.proc.pid)
        async with aiohttp.ClientSession() as s:
            assert (await chat(s, server, "m"))[0] == 200
    finally:
        assert server.stop() == 0
    assert wait_until(lambda: not pid_alive(watcher), 5)
    assert not upstreams.alive()


async def test_a_second_start_on_a_busy_address_touches_nothing(tmp_path, upstreams):
    config = {"healthCheckTimeout": 15,
              "models": {"m": {"cmd": upstreams.cmd("--fork-grandchild", name="m")}}}
    first = LlamaSwap(tmp_path, config)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(first.url + "/v1/chat/completions", json={
                    "model": "m", "stream": True, "messages": [], "responder_chunks": 40, "responder_delay": 0.1}) as r:
                assert r.status == 200
                await r.content.readline()  # mid-stream
                alive = upstreams.alive()
                assert len(alive) == 2  # the wrapper and its grandchild
                for argv in ([PY, "-m", "llama_swap", "--config", str(first.config_path),
                              "--listen", f"127.0.0.1:{first.port}"],
                             [PY, "-m", "llama_swap", "--demo", "--listen", f"127.0.0.1:{first.port}"]):
                    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
                    assert second.returncode == 1, second.stdout + second.stderr
                    assert "address already in use" in (second.stdout + second.stderr).lower()
                    assert "left running" not in second.stdout + second.stderr
                assert upstreams.alive() == alive, "the second start stopped the first one's models"
                rest = (await r.read()).decode()
        assert rest.rstrip().endswith("data: [DONE]"), "the stream was cut"
        assert os.path.exists(group_record_path("127.0.0.1", first.port)), "the first one's record was deleted"
    finally:
        assert first.stop() == 0

