"""One test per bug fixed after review; each fails on the behaviour it replaced.

Every test runs a real llama-swap in front of real `llama_swap_responder.py` upstreams (or small
shell commands) and checks what a client and the operating system can see. Timing checks are
loose upper bounds, or lower bounds only where a clock must have passed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import time
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from conftest import PY, ROOT, assert_envelope, eventually, pid_alive, running

HEALTH_TIMEOUT = 15  # the minimum healthCheckTimeout: the graceful window of an eviction
TIMEOUT = aiohttp.ClientTimeout(total=90)


# --------------------------------------------------------------------------- helpers


def config(models: dict[str, dict], **top) -> dict:
    """No `groups` key: every model is in the default group (exclusive, swap: one at a time)."""
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": models}


def write(ls, cfg: dict) -> None:
    ls.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def parse(raw: bytes) -> dict:
    """A JSON reply, or {"raw": text} for anything else (aiohttp's own 500 page, say)."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"raw": raw[:2000].decode(errors="replace")}


async def chat(session: aiohttp.ClientSession, ls, model: str, **extra) -> tuple[int, dict]:
    async with session.post(ls.url + "/v1/chat/completions", json={"model": model, **extra}) as r:
        return r.status, parse(await r.read())


async def reload(session: aiohttp.ClientSession, ls) -> tuple[int, dict]:
    async with session.post(ls.url + "/api/config/reload") as r:
        return r.status, parse(await r.read())


async def running_models(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in await running(session, ls)}


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


# --------------------------------------------------------------------------- 1. reload removes a streaming model


async def test_reload_removing_a_streaming_model_in_the_default_group_drains_it_then_serves_the_next(
        start_llama_swap, upstreams):
    cfg = config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}})
    ls = start_llama_swap(cfg)
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


# --------------------------------------------------------------------------- 2. unload while a removed model drains


async def test_unload_all_while_a_removed_model_is_still_draining_returns_200(start_llama_swap, upstreams):
    cfg = config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}})
    ls = start_llama_swap(cfg)
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


# --------------------------------------------------------------------------- 3. unload during an eviction


async def test_unloading_the_target_of_a_swap_while_it_evicts_then_asking_again_starts_it(start_llama_swap, upstreams):
    ls = start_llama_swap(config({
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


# --------------------------------------------------------------------------- 4. a command that cannot start


@pytest.mark.parametrize("cmd, program", [
    ("/nonexistent/binary --port ${PORT}", "/nonexistent/binary"),  # exec fails: OSError
    ("/bin/echo a\x00b --port ${PORT}", "/bin/echo"),  # an argument with a NUL byte: ValueError
], ids=["missing-binary", "nul-byte"])
async def test_a_command_that_cannot_be_started_is_a_clear_error_every_time(start_llama_swap, upstreams, cmd, program):
    ls = start_llama_swap(config({"m": {"cmd": cmd}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for attempt in range(2):
            status, body = await asyncio.wait_for(chat(s, ls, "m"), 30)
            message = assert_envelope(status, body, "unspecific error: failed to start command")
            assert program in message, (attempt, message)
        assert await running(s, ls) == []


def test_check_config_rejects_a_cmd_that_splits_to_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"cmd": "\\", "proxy": "http://127.0.0.1:9"}}}))
    result = subprocess.run([PY, "-m", "llama_swap", "--config", str(path), "--check-config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "models.m.cmd" in lines[0], output


# --------------------------------------------------------------------------- 5. crash with a grandchild holding stdout


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


# --------------------------------------------------------------------------- 6. stops are bounded


async def test_a_child_that_ignores_sigterm_while_the_leader_exits_is_killed_after_unload_timeout(
        start_llama_swap, upstreams):
    duration = unique_sleep()
    # `trap "" TERM` is inherited by the background sleep; the responder installs its own handler.
    cmd = f"sh -c 'trap \"\" TERM; sleep {duration} & exec {upstreams.cmd(name='m')}'"
    ls = start_llama_swap(config({"m": {"cmd": cmd, "unloadTimeout": 1}}))
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
        start_llama_swap, upstreams, tmp_path):
    duration = unique_sleep()
    marker = tmp_path / "stop-env"
    stop = f"sh -c 'echo $STOP_MARK > {marker}; sleep {duration}'"
    ls = start_llama_swap(config({"m": {"cmd": upstreams.cmd(name="m"), "cmdStop": stop, "unloadTimeout": 2,
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


# --------------------------------------------------------------------------- 7. start errors quote this run only


async def test_a_failed_start_quotes_only_the_output_of_that_run(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"m": {"cmd": "sh -c 'echo RUN-$$-MARK; exit 1'", "proxy": "http://127.0.0.1:9"}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        runs = []
        for _ in range(2):
            status, body = await asyncio.wait_for(chat(s, ls, "m"), 30)
            message = assert_envelope(status, body, "unspecific error: upstream command exited prematurely")
            marks = re.findall(r"RUN-\d+-MARK", message)
            assert len(marks) == 1, message
            runs.append(marks[0])
        assert runs[0] != runs[1], runs


# --------------------------------------------------------------------------- 8. HEAD keeps Content-Length


async def test_head_through_upstream_keeps_the_upstream_content_length(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"a": {"cmd": upstreams.cmd(name="a")}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/upstream/a/") as r:
            assert r.status == 200
            page = await r.read()
        entry = next(e for e in await running(s, ls) if e["model"] == "a")
        port = urlsplit(entry["proxy"]).port
        async with s.head(f"http://127.0.0.1:{port}/", allow_redirects=False) as direct:
            assert direct.status == 200
            expected = direct.headers.get("Content-Length")
        assert expected == str(len(page))
        async with s.head(ls.url + "/upstream/a/", allow_redirects=False) as proxied:
            assert proxied.status == 200
            assert proxied.headers.get("Content-Length") == expected, dict(proxied.headers)
            assert await proxied.read() == b""


# --------------------------------------------------------------------------- 9. model extraction on a big body


async def test_model_after_a_12_mb_messages_array_is_found_quickly(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}))
    blob = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0MTIzNDU2Nzg5K/=" * 250_000)[:12 * 1024 * 1024].decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + blob}}]},
                {"role": "assistant", "content": "a \"quoted\" {brace} [bracket] \\ model"}]
    body = json.dumps({"messages": messages, "model": "b", "max_tokens": 5}).encode()
    assert len(body) > 12 * 1024 * 1024
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        began = time.monotonic()
        async with s.post(ls.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            status = r.status
            reply = json.loads(await r.read())
        elapsed = time.monotonic() - began
    assert status == 200, str(reply)[:1000]
    assert reply["model"] == "b"
    assert reply["echo"]["body_len"] == len(body)
    assert elapsed < 20, f"a 12 MB request took {elapsed:.1f}s"


async def test_a_body_past_max_request_body_gets_a_413_envelope_and_nothing_starts(start_llama_swap, upstreams):
    ls = start_llama_swap({"maxRequestBodyMB": 1, "healthCheckTimeout": 15,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    huge = b'{"model":"m","prompt":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/completions", data=huge, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            body = await r.json()
        assert body["error"]["message"] == "request body too large: the limit is 1 MB (maxRequestBodyMB)"
        assert upstreams.alive() == []  # refused before any model was started
        async with s.post(ls.url + "/v1/completions", json={"model": "m", "prompt": "small"}) as r:
            assert r.status == 200  # and the server goes on
