"""Model lifecycle through a real llama-swap: swaps, shared starts, failed starts, stops, shutdown.

Every test runs `python -m llama_swap` with fake upstreams (llama_swap_responder.py) and checks
what a client and the operating system can see: HTTP answers, /running, /v1/models, the pids
the upstreams wrote to the pid file and whether those processes are still alive. Timing
assertions are orderings or loose upper bounds; lower bounds only where the clock must have
passed (a graceful stop window that has to be waited out).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time

import aiohttp
import openai
import pytest

from helpers import assert_envelope, chat, eventually, pid_alive, running

HEALTH_TIMEOUT = 15  # the minimum healthCheckTimeout; every config uses it
START_BOUND = 20.0  # seconds a cold responder may take to become ready on a slow machine
STOP_BOUND = 10.0  # a loose upper bound for stops that should be prompt
TIMEOUT = aiohttp.ClientTimeout(total=90)


# --------------------------------------------------------------------------- helpers


def config(models: dict[str, dict], **top) -> dict:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": models}


async def nothing_running(session: aiohttp.ClientSession, ls) -> bool:
    return await running(session, ls) == []


async def running_models(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in await running(session, ls)}


async def listed_status(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    async with session.get(ls.url + "/v1/models") as r:
        assert r.status == 200
        return {m["id"]: m["status"]["value"] for m in (await r.json())["data"]}


async def unload(session: aiohttp.ClientSession, ls, model: str | None = None) -> tuple[int, str, float]:
    """POST an unload; (status, body, seconds it took)."""
    path = "/api/models/unload" + (f"/{model}" if model else "")
    began = time.monotonic()
    async with session.post(ls.url + path) as r:
        return r.status, await r.text(), time.monotonic() - began


async def read_sse(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: "):])
    return events


def content_tokens(events: list[str]) -> list[str]:
    tokens = []
    for data in events:
        if data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            if choice["delta"].get("content"):
                tokens.append(choice["delta"]["content"])
    return tokens


def openai_client(ls) -> openai.AsyncOpenAI:
    # No retries: a retried request would start models the test does not expect.
    return openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def upstream_pid(session: aiohttp.ClientSession, ls, model: str) -> int:
    async with session.get(f"{ls.url}/upstream/{model}/_responder/info") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["pid"]


def pids_running(*argv: str) -> list[int]:
    """Live processes whose command line is exactly `argv` (zombies excluded)."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline == want and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def unique_sleep() -> str:
    """A `sleep` duration no other test (or parallel run) uses, so its process can be found."""
    return str(random.randrange(3000, 9000))


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- swapping


async def test_swap_stops_previous_model_and_lists_only_the_new_one(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "a")
        assert status == 200, body
        assert body["model"] == "a"
        async with s.get(ls.url + "/upstream/a/_responder/info") as r:
            a_pid = (await r.json())["pid"]
        assert upstreams.pids() == [a_pid]
        assert await running_models(s, ls) == {"a": "ready"}
        assert await listed_status(s, ls) == {"a": "loaded", "b": "unloaded"}

        status, body = await chat(s, ls, "b")
        assert status == 200, body
        assert body["model"] == "b"

        assert not pid_alive(a_pid), "a's upstream must be stopped before b is served"
        assert len(upstreams.pids()) == 2
        b_pid = upstreams.pids()[1]
        assert pid_alive(b_pid)
        entries = await running(s, ls)
        assert [(e["model"], e["state"]) for e in entries] == [("b", "ready")]
        assert await listed_status(s, ls) == {"a": "unloaded", "b": "loaded"}


async def test_cold_requests_a_b_a_b_are_collated_into_one_start_per_model(in_process, upstreams):
    ls = await in_process(config({
        "a": {"cmd": upstreams.cmd("--startup-delay", "0.5", name="a")},
        "b": {"cmd": upstreams.cmd("--startup-delay", "0.5", name="b")},
    }))
    completed: list[str] = []

    async def ask(s, model):
        status, body = await chat(s, ls, model)
        assert status == 200, body
        assert body["model"] == model
        completed.append(model)

    async with aiohttp.ClientSession() as s:
        tasks = []
        for model in ("a", "b", "a", "b"):
            tasks.append(asyncio.create_task(ask(s, model)))
            await asyncio.sleep(0.1)  # arrival order a, b, a, b
        await asyncio.wait_for(asyncio.gather(*tasks), 3 * START_BOUND)

    assert completed == ["a", "a", "b", "b"], "queued requests must be collated by model, not alternated"
    assert len(upstreams.pids()) == 2, f"expected one start per model, got pids {upstreams.pids()}"


async def test_concurrent_requests_for_a_cold_model_share_one_start(in_process, upstreams):
    # concurrencyLimit is raised so that the default admission limit of 10 requests per model does not apply.
    ls = await in_process(config({"a": {"cmd": upstreams.cmd("--startup-delay", "0.5", name="a"),
                                        "concurrencyLimit": 50}}))
    client = openai_client(ls)
    try:
        replies = await asyncio.wait_for(asyncio.gather(*(
            client.chat.completions.create(model="a", messages=[{"role": "user", "content": f"hi {i}"}])
            for i in range(20))), 2 * START_BOUND)
    finally:
        await client.close()
    assert [r.choices[0].message.content for r in replies] == ["hello from a"] * 20
    assert len(upstreams.pids()) == 1, f"20 waiters must share one start, got pids {upstreams.pids()}"


async def test_a_swap_never_kills_a_model_that_is_still_streaming(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}))
    async with aiohttp.ClientSession() as s:
        b_task = None
        stream_body = {"model": "a", "stream": True, "responder_delay": 0.2, "responder_chunks": 10}
        async with s.post(ls.url + "/v1/chat/completions", json=stream_body) as r:
            assert r.status == 200
            events = []
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if b_task is None:  # a is serving now: ask for b, which needs a stopped
                    b_task = asyncio.create_task(chat(s, ls, "b"))
        a_done = time.monotonic()
        assert b_task is not None
        assert not b_task.done(), "b was served while a was still streaming"
        status, body = await asyncio.wait_for(b_task, START_BOUND)
        b_done = time.monotonic()

    assert events[-1] == "[DONE]", events
    assert content_tokens(events) == [f"tok{i} " for i in range(10)]
    assert status == 200, body
    assert body["model"] == "b"
    assert b_done > a_done
    a_pid, b_pid = upstreams.pids()
    assert not pid_alive(a_pid)
    assert pid_alive(b_pid)


async def test_a_queued_request_whose_client_left_starts_nothing(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}))
    async with aiohttp.ClientSession() as s:
        stream_body = {"model": "a", "stream": True, "responder_delay": 0.2, "responder_chunks": 10}
        async with s.post(ls.url + "/v1/chat/completions", json=stream_body) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            a_pid = upstreams.pids()[0]

            # b must wait for a's stream; its client gives up while it is queued.
            b_session = aiohttp.ClientSession()
            b_task = asyncio.create_task(chat(b_session, ls, "b"))
            await asyncio.sleep(0.7)
            assert not b_task.done()
            b_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b_task
            await b_session.close()

            events = await read_sse(r)
        assert events[-1] == "[DONE]"

        # Nothing may start b now that a is idle.
        await asyncio.sleep(1.5)
        assert upstreams.pids() == [a_pid], "a request withdrawn from the queue started its model"
        assert await running_models(s, ls) == {"a": "ready"}

        status, body = await chat(s, ls, "a")
        assert status == 200, body
        assert upstreams.pids() == [a_pid], "a later request for the loaded model must go straight through"
        assert pid_alive(a_pid)


# --------------------------------------------------------------------------- failed starts


async def test_premature_exit_fails_the_request_with_the_upstream_output_and_next_request_retries(in_process,
                                                                                                  upstreams):
    # The startup delay keeps the port closed, so the crash happens during the health check.
    cmd = upstreams.cmd("--startup-delay", "5", "--exit-after", "0.3", name="oom")
    ls = await in_process(config({"oom": {"cmd": cmd}}))
    async with aiohttp.ClientSession() as s:
        status, body = await asyncio.wait_for(chat(s, ls, "oom"), START_BOUND)
        message = assert_envelope(status, body, "unspecific error: upstream command exited prematurely")
        assert "out of memory (simulated)" in message, message
        assert len(upstreams.pids()) == 1
        assert await running(s, ls) == []

        status, body = await asyncio.wait_for(chat(s, ls, "oom"), START_BOUND)
        assert_envelope(status, body, "unspecific error: upstream command exited prematurely")
        assert len(upstreams.pids()) == 2, "the second request must start the model again"
    assert not upstreams.alive()


async def test_health_check_timeout_fails_the_request_and_kills_the_process(in_process, upstreams):
    ls = await in_process(config({"sick": {"cmd": upstreams.cmd("--health-status", "500", name="sick")}}))
    async with aiohttp.ClientSession() as s:
        began = time.monotonic()
        status, body = await asyncio.wait_for(chat(s, ls, "sick"), HEALTH_TIMEOUT + 25)
        elapsed = time.monotonic() - began
        message = assert_envelope(status, body, "unspecific error: health check timed out after 15s; last output:\n")
        assert "responder sick listening on http://" in message  # what it printed says what went wrong
        assert elapsed >= HEALTH_TIMEOUT - 0.5
        assert len(upstreams.pids()) == 1
        assert await eventually(lambda: not upstreams.alive(), STOP_BOUND), "a timed-out start must kill its process"
        assert await running(s, ls) == []


async def test_unload_during_start_fails_the_waiting_request_and_kills_the_process(in_process, upstreams):
    ls = await in_process(config({"slow": {"cmd": upstreams.cmd("--startup-delay", "3", name="slow")}}))
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(chat(s, ls, "slow"))
        assert await eventually(lambda: upstreams.pids(), START_BOUND), "the model was never spawned"
        await asyncio.sleep(0.5)
        assert await running_models(s, ls) == {"slow": "starting"}

        status, text, took = await unload(s, ls, "slow")
        assert (status, text) == (200, "OK")
        assert took < STOP_BOUND

        status, body = await asyncio.wait_for(waiting, STOP_BOUND)
        message = assert_envelope(status, body, "unspecific error: ")
        assert message == "unspecific error: group: model unloaded"
        assert not upstreams.alive(), "unload returned while the starting process was alive"
        assert await running(s, ls) == []


async def test_unloading_the_target_of_a_swap_while_it_evicts_then_asking_again_starts_it(in_process, upstreams):
    ls = await in_process(config({
        "a": {"cmd": upstreams.cmd("--sigterm-delay", "1.5", name="a")},
        "b": {"cmd": upstreams.cmd(name="b")},
    }))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, reply = await chat(s, ls, "a")
        assert status == 200 and reply["model"] == "a", reply
        a_pid = await upstream_pid(s, ls, "a")

        waiting = asyncio.create_task(chat(s, ls, "b"))  # evicts a, which takes 1.5 s to stop

        async def a_stopping() -> bool:
            return (await running_models(s, ls)).get("a") == "stopping"

        assert await eventually(a_stopping, 10), await running_models(s, ls)
        async with s.post(ls.url + "/api/models/unload/b") as r:
            assert r.status == 200, await r.text()

        status, body = await asyncio.wait_for(waiting, 30)
        assert_envelope(status, body, "unspecific error: group: model unloaded")

        status, reply = await asyncio.wait_for(chat(s, ls, "b"), 30)
        assert status == 200, reply
        assert reply["model"] == "b"
        assert not pid_alive(a_pid)
        assert await running_models(s, ls) == {"b": "ready"}


@pytest.mark.parametrize("cmd, program", [
    ("/nonexistent/binary --port ${PORT}", "/nonexistent/binary"),  # exec fails: OSError
    ("/bin/echo a\x00b --port ${PORT}", "/bin/echo"),  # an argument with a NUL byte: ValueError
], ids=["missing-binary", "nul-byte"])
async def test_a_command_that_cannot_be_started_is_a_clear_error_every_time(in_process, upstreams, cmd, program):
    ls = await in_process(config({"m": {"cmd": cmd}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for attempt in range(2):
            status, body = await asyncio.wait_for(chat(s, ls, "m"), 30)
            message = assert_envelope(status, body, "unspecific error: failed to start command")
            assert program in message, (attempt, message)
        assert await running(s, ls) == []


async def test_a_failed_start_quotes_only_the_output_of_that_run(in_process, upstreams):
    ls = await in_process(config({"m": {"cmd": "sh -c 'echo RUN-$$-MARK; exit 1'", "proxy": "http://127.0.0.1:9"}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        runs = []
        for _ in range(2):
            status, body = await asyncio.wait_for(chat(s, ls, "m"), 30)
            message = assert_envelope(status, body, "unspecific error: upstream command exited prematurely")
            marks = re.findall(r"RUN-\d+-MARK", message)
            assert len(marks) == 1, message
            runs.append(marks[0])
        assert runs[0] != runs[1], runs


# --------------------------------------------------------------------------- stopping


async def test_unload_escalates_to_sigkill_when_sigterm_is_ignored(in_process, upstreams):
    ls = await in_process(config({"stubborn": {"cmd": upstreams.cmd("--ignore-sigterm", name="stubborn"),
                                               "unloadTimeout": 1}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "stubborn")
        assert status == 200, body
        [pid] = upstreams.pids()

        status, text, took = await unload(s, ls)
        assert status == 200
        assert json.loads(text) == {"msg": "ok"}
        assert 0.9 <= took < STOP_BOUND, f"unload took {took:.2f}s; SIGKILL is due after unloadTimeout (1s)"
        assert not pid_alive(pid)
        assert await running(s, ls) == []
    assert "SIGKILL" in ls.output()


async def test_unload_lets_a_slow_process_exit_within_its_unload_timeout(in_process, upstreams):
    ls = await in_process(config({"slow": {"cmd": upstreams.cmd("--sigterm-delay", "0.6", name="slow"),
                                           "unloadTimeout": 5}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "slow")
        assert status == 200, body
        [pid] = upstreams.pids()

        status, text, took = await unload(s, ls)
        assert status == 200
        assert took >= 0.5, f"unload returned after {took:.2f}s, before the process could exit by itself"
        assert took < STOP_BOUND
        assert not pid_alive(pid)
    assert "SIGKILL" not in ls.output(), "a process exiting within unloadTimeout must not be SIGKILLed"


async def test_unload_reaps_a_grandchild_left_behind_by_its_parent(in_process, upstreams):
    ls = await in_process(config({"wrapped": {"cmd": upstreams.cmd("--fork-grandchild", name="wrapped")}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "wrapped")
        assert status == 200, body
        pids = upstreams.pids()
        assert len(pids) == 2, f"expected the wrapper and its grandchild, got {pids}"
        assert all(pid_alive(pid) for pid in pids)

        status, _text, took = await unload(s, ls, "wrapped")
        assert status == 200
        # The default unloadTimeout is 10 s: a prompt stop means the grandchild got the signal too.
        assert took < 8
        assert [pid for pid in pids if pid_alive(pid)] == []
        assert await running(s, ls) == []
    assert "SIGKILL" not in ls.output()


async def test_a_child_that_ignores_sigterm_while_the_leader_exits_is_killed_after_unload_timeout(
        in_process, upstreams):
    duration = unique_sleep()
    # `trap "" TERM` is inherited by the background sleep; the responder installs its own handler.
    cmd = f"sh -c 'trap \"\" TERM; sleep {duration} & exec {upstreams.cmd(name='m')}'"
    ls = await in_process(config({"m": {"cmd": cmd, "unloadTimeout": 1}}))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, reply = await chat(s, ls, "m")
            assert status == 200, reply
            pid = await upstream_pid(s, ls, "m")
            assert len(pids_running("sleep", duration)) == 1
            began = time.monotonic()
            async with s.post(ls.url + "/api/models/unload/m") as r:
                assert r.status == 200, await r.text()
            elapsed = time.monotonic() - began
            assert elapsed >= 0.9, f"the stubborn child must get its 1 s graceful window ({elapsed:.2f}s)"
            assert elapsed < 8, f"unload took {elapsed:.2f}s with unloadTimeout 1"
            assert not pid_alive(pid)
            assert not pids_running("sleep", duration), "the child that ignored SIGTERM must be SIGKILLed"
            assert await running(s, ls) == []
    finally:
        kill_all(pids_running("sleep", duration))


async def test_a_hanging_cmd_stop_shares_one_deadline_with_the_stop_and_is_killed_too(
        in_process, upstreams, tmp_path):
    duration = unique_sleep()
    marker = tmp_path / "stop-env"
    stop = f"sh -c 'echo $STOP_MARK > {marker}; sleep {duration}'"
    ls = await in_process(config({"m": {"cmd": upstreams.cmd(name="m"), "cmdStop": stop, "unloadTimeout": 2,
                                        "env": ["STOP_MARK=from-model-env"]}}))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, reply = await chat(s, ls, "m")
            assert status == 200, reply
            pid = await upstream_pid(s, ls, "m")
            began = time.monotonic()
            async with s.post(ls.url + "/api/models/unload/m") as r:
                assert r.status == 200, await r.text()
            elapsed = time.monotonic() - began
            assert elapsed >= 1.9, f"the graceful window is unloadTimeout (2 s), got {elapsed:.2f}s"
            assert elapsed < 10, f"unload took {elapsed:.2f}s with unloadTimeout 2"
            assert not pid_alive(pid), "the server must be SIGKILLed once the window is over"
            assert await eventually(lambda: not pids_running("sleep", duration), 3), \
                "the stop command must not outlive the stop"
            assert marker.read_text().strip() == "from-model-env", "cmdStop runs with the model's env"
    finally:
        kill_all(pids_running("sleep", duration))


async def test_a_crashed_model_is_started_again_by_the_next_request(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}}))
    client = openai_client(ls)
    try:
        reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello from a"
        [first] = upstreams.pids()

        os.kill(first, signal.SIGKILL)
        async with aiohttp.ClientSession() as s:
            assert await eventually(lambda: nothing_running(s, ls), STOP_BOUND), "a crashed model must leave /running"
            assert await listed_status(s, ls) == {"a": "unloaded"}
        assert "upstream process exited unexpectedly" in ls.output()

        reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "again"}])
        assert reply.choices[0].message.content == "hello from a"
    finally:
        await client.close()
    pids = upstreams.pids()
    assert len(pids) == 2 and pids[0] == first, pids
    assert pid_alive(pids[1])


async def test_a_crash_is_noticed_while_a_grandchild_keeps_the_output_open(start_llama_swap, upstreams):
    duration = unique_sleep()
    cmd = f"sh -c 'sleep {duration} & exec {upstreams.cmd(name='m')}'"
    ls = start_llama_swap(config({"m": {"cmd": cmd}}))
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, reply = await chat(s, ls, "m")
            assert status == 200 and reply["model"] == "m", reply
            pid = await upstream_pid(s, ls, "m")
            first_sleeps = pids_running("sleep", duration)
            assert len(first_sleeps) == 1, first_sleeps

            os.kill(pid, signal.SIGKILL)

            async def nothing_running() -> bool:
                return await running(s, ls) == []

            assert await eventually(nothing_running, 10), f"crash not noticed: {await running(s, ls)}"
            status, reply = await asyncio.wait_for(chat(s, ls, "m"), 30)
            assert status == 200 and reply["model"] == "m", reply
            new_pid = await upstream_pid(s, ls, "m")
            assert new_pid != pid
            assert await running_models(s, ls) == {"m": "ready"}
        assert ls.stop() == 0
        assert await eventually(lambda: not pids_running("sleep", duration), 5), \
            f"sleep {duration} left running: {pids_running('sleep', duration)}"
    finally:
        kill_all(pids_running("sleep", duration))


# --------------------------------------------------------------------------- shutdown


async def test_sigterm_stops_a_loaded_model_and_exits_0(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"a": {"cmd": upstreams.cmd(name="a")}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "a")
        assert status == 200, body
    [pid] = upstreams.pids()
    assert pid_alive(pid)

    began = time.monotonic()
    code = await asyncio.to_thread(ls.stop)
    took = time.monotonic() - began
    assert code == 0, ls.output()
    assert took < STOP_BOUND
    assert not pid_alive(pid)
    assert "shutdown complete" in ls.output()


async def test_sigterm_during_a_start_exits_promptly_and_leaves_nothing_running(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"slow": {"cmd": upstreams.cmd("--startup-delay", "5", name="slow")}}))
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(chat(s, ls, "slow"))
        assert await eventually(lambda: upstreams.pids(), START_BOUND), "the model was never spawned"
        assert await running_models(s, ls) == {"slow": "starting"}

        began = time.monotonic()
        code = await asyncio.to_thread(ls.stop)
        took = time.monotonic() - began
        assert code == 0, ls.output()
        assert took < 15, f"shutdown took {took:.1f}s"
        assert not upstreams.alive()

        status, body = await asyncio.wait_for(waiting, STOP_BOUND)
        message = assert_envelope(status, body, "unspecific error: ")
        assert message == "unspecific error: group is shutting down"


# --------------------------------------------------------------------------- config that shapes a run


async def test_cmd_stop_runs_with_the_server_pid_instead_of_sigterm(in_process, upstreams, tmp_path):
    marker = tmp_path / "cmd-stop-ran"
    stop = f"sh -c 'echo ${{PID}} > {marker}; kill -TERM ${{PID}}'"
    ls = await in_process(config({"m": {"cmd": upstreams.cmd(name="m"), "cmdStop": stop, "unloadTimeout": 5}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "m")
        assert status == 200, body
        [pid] = upstreams.pids()
        status, _, took = await unload(s, ls, "m")
        assert status == 200 and took < STOP_BOUND
    assert marker.read_text().strip() == str(pid)
    assert not pid_alive(pid)
    assert "SIGKILL" not in ls.output()


async def test_env_entries_reach_the_upstream_and_a_failed_start_quotes_its_output(in_process, upstreams):
    cmd = "sh -c 'echo model dir is $MODEL_DIR; exit 3'"
    ls = await in_process(config({"m": {"cmd": cmd, "proxy": "http://127.0.0.1:9", "env": ["MODEL_DIR=/srv/models"]}}))
    async with aiohttp.ClientSession() as s:
        status, body = await asyncio.wait_for(chat(s, ls, "m"), START_BOUND)
    message = assert_envelope(status, body, "unspecific error: upstream command exited prematurely with exit status 3")
    assert "model dir is /srv/models" in message


async def test_a_missing_executable_is_a_start_error_naming_the_command(in_process, upstreams):
    ls = await in_process(config({"m": {"cmd": "/nonexistent/llama-server --port 1", "proxy": "http://127.0.0.1:1"}}))
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, ls, "m")
    message = assert_envelope(status, body,
                              "unspecific error: failed to start command '/nonexistent/llama-server --port 1'")
    assert "No such file or directory" in message


async def test_check_endpoint_none_makes_a_model_ready_without_probing(in_process, upstreams):
    ls = await in_process(config({"m": {"cmd": upstreams.cmd(name="m"), "checkEndpoint": "none"}}))
    async with aiohttp.ClientSession() as s:
        await chat(s, ls, "m")  # ready at once; the server may not be listening yet (502)
        assert await running_models(s, ls) == {"m": "ready"}

        async def answers() -> bool:
            return (await chat(s, ls, "m"))[0] == 200

        assert await eventually(answers, START_BOUND)
        async with s.get(ls.url + "/upstream/m/_responder/info") as r:
            assert (await r.json())["health_checks"] == 0
