"""Watching llama-swap: /logs, /logs/stream[/<id>], /api/events, and the log
wiring behind them (log monitors, logToStdout, logTimeFormat, slow readers).

Streams are read as `curl -N` reads them: by a task that takes each chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import signal
import time
import urllib.request
from typing import Any

import aiohttp
import pytest

import helpers
from helpers import LlamaSwap, chat, eventually, wait_until
from llama_swap import LogStream

TEXT_PLAIN = "text/plain"
INVALID_LOGGER = "invalid logger. Use 'proxy', 'upstream' or a model's ID"
DROP_MARKER = re.compile(r"\n\u2014 (\d+) bytes dropped \u2014\n")


# -- harness -----------------------------------------------------------------------------------


class QuietLlamaSwap(LlamaSwap):
    """A llama-swap whose stdout may stay silent (logToStdout `upstream` or `none`): it has
    started once /health answers, not once it prints "listening on"."""

    def wait_for(self, text: str, timeout: float = 20) -> bool:
        if text != "listening on":
            return super().wait_for(text, timeout)
        return wait_until(lambda: self.healthy() or self.proc.poll() is not None, timeout) and self.healthy()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


@pytest.fixture
def start_quiet_llama_swap(start_llama_swap, monkeypatch):
    """start_llama_swap (same teardown checks) for configs that print nothing to stdout."""
    monkeypatch.setattr(helpers, "LlamaSwap", QuietLlamaSwap)
    return start_llama_swap


class Reader:
    """A streaming response read as it arrives, by a task of its own."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.data = bytearray()
        self.end: str | None = None  # "eof", or the name of the error that cut the stream
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while chunk := await self.response.content.readany():
                self.data += chunk
            self.end = "eof"
        except (aiohttp.ClientError, ConnectionError) as e:
            self.end = type(e).__name__

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    async def shows(self, text: str, timeout: float = 30) -> bool:
        needle, start = text.encode(), 0

        def found() -> bool:  # searching only what is new: a flood must not slow the reader down
            nonlocal start
            if self.data.find(needle, start) >= 0:
                return True
            start = max(0, len(self.data) - len(needle) + 1)
            return False
        return await eventually(found, timeout)


@contextlib.asynccontextmanager
async def reading(session: aiohttp.ClientSession, url: str, **kwargs):
    """GET a stream and read it in the background for as long as the block runs."""
    async with session.get(url, **kwargs) as r:
        assert r.status == 200, await r.text()
        reader = Reader(r)
        try:
            yield reader
        finally:
            reader.task.cancel()


class EventReader(Reader):
    """An /api/events stream: `messages` are its (type, decoded inner data) pairs so far."""

    @property
    def messages(self) -> list[tuple[str, Any]]:
        messages = []
        for block in self.text.split("\n\n")[:-1]:  # the last part is an unfinished message
            event, data = block.split("\n")
            assert event == "event:message", block
            assert data.startswith("data:"), block
            outer = json.loads(data[len("data:"):])
            assert set(outer) == {"type", "data"} and isinstance(outer["data"], str), block  # JSON in a JSON string
            messages.append((outer["type"], json.loads(outer["data"])))
        return messages

    def of(self, kind: str) -> list[Any]:
        return [data for t, data in self.messages if t == kind]


@contextlib.asynccontextmanager
async def watching_events(session: aiohttp.ClientSession, ls):
    async with session.get(ls.url + "/api/events") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["Cache-Control"] == "no-cache"
        reader = EventReader(r)
        try:
            yield reader
        finally:
            reader.task.cancel()


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as r:
        assert r.status == 200
        return await r.text()


def model(upstreams, name: str, *args: str, **settings) -> dict:
    return {"cmd": upstreams.cmd(*args, name=name), **settings}


def side_by_side(upstreams, models: dict[str, dict], **top) -> dict:
    """Models that may all run at once (one group, no swapping)."""
    return {"healthCheckTimeout": 30, **top,
            "groups": {"all": {"swap": False, "exclusive": False, "members": list(models)}}, "models": models}


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# -- /logs/stream --------------------------------------------------------------------------------


async def test_the_log_stream_sends_history_then_each_line_as_it_happens(start_llama_swap, upstreams):
    ls = start_llama_swap(side_by_side(upstreams, {"m": model(upstreams, "m", "--startup-delay", "2")},
                                       logToStdout="both"))
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/logs/stream") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == TEXT_PLAIN
            assert r.headers["X-Accel-Buffering"] == "no"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Transfer-Encoding"] == "chunked"
            stream = Reader(r)
            assert await stream.shows("llama-swap listening on")  # the history
            assert "loading model..." not in stream.text
            request = asyncio.create_task(chat(s, ls, "m"))
            # The upstream's output arrives while it is still loading, not once the request is done.
            assert await stream.shows("loading model...")
            assert not request.done()
            assert (await request)[0] == 200
            assert await stream.shows('"POST /v1/chat/completions HTTP/1.1" 200')
            stream.task.cancel()
    text = stream.text
    order = [text.index("llama-swap listening on"), text.index("loading model..."),
             text.index("responder m listening on"), text.index("<m> Health check passed"),
             text.index('"POST /v1/chat/completions HTTP/1.1" 200')]
    assert order == sorted(order), text


async def test_the_log_stream_with_default_wiring_shows_proxy_lines_live_but_no_upstream_output(start_llama_swap,
                                                                                                upstreams):
    ls = start_llama_swap(side_by_side(upstreams, {"m": model(upstreams, "m", "--startup-delay", "2")}))
    async with aiohttp.ClientSession() as s:
        async with reading(s, ls.url + "/logs/stream") as stream:
            assert await stream.shows("llama-swap listening on")
            request = asyncio.create_task(chat(s, ls, "m", responder_sleep=2))
            assert await stream.shows("<m> Health check passed")
            assert not request.done()  # live: before the request it serves has finished
            assert (await request)[0] == 200
            assert await stream.shows('"POST /v1/chat/completions HTTP/1.1" 200')
            async with reading(s, ls.url + "/logs/stream/m") as own:  # the output was there all along
                assert await own.shows("loading model...")
        assert "loading model..." not in stream.text and "responder m" not in stream.text


@pytest.mark.parametrize("query", ["?no-history", "?no-history=false"])
async def test_no_history_skips_what_was_logged_before_connecting(start_llama_swap, upstreams, query):
    ls = start_llama_swap({"models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        await get_text(s, ls.url + "/running")  # its access-log line is history from now on
        assert await eventually(lambda: '"GET /running HTTP/1.1" 200' in ls.output(), 10)
        async with reading(s, ls.url + "/logs/stream" + query) as stream:
            await get_text(s, ls.url + "/v1/models")
            assert await stream.shows('"GET /v1/models HTTP/1.1" 200')
        async with reading(s, ls.url + "/logs/stream") as with_history:
            assert await with_history.shows('"GET /v1/models HTTP/1.1" 200')
    assert "/running" not in stream.text and "listening on" not in stream.text
    assert '"GET /running HTTP/1.1" 200' in with_history.text


async def test_each_log_can_be_streamed_alone_and_models_are_found_by_id_or_alias(start_llama_swap, upstreams):
    ls = start_llama_swap(side_by_side(upstreams, {
        "org/model-a": model(upstreams, "org/model-a", aliases=["a"]), "b": model(upstreams, "b")},
        peers={"p": {"proxy": "http://127.0.0.1:9", "models": ["far"]}}))
    urls = {name: f"{ls.url}/logs/stream/{name}" for name in ("proxy", "upstream", "org/model-a", "a", "b")}
    urls["with a rest"] = f"{ls.url}/logs/stream/org/model-a/anything"  # the longest model prefix counts
    async with aiohttp.ClientSession() as s, contextlib.AsyncExitStack() as stack:
        streams = {name: await stack.enter_async_context(reading(s, url)) for name, url in urls.items()}
        assert (await chat(s, ls, "a"))[0] == 200
        for name in ("upstream", "org/model-a", "a", "with a rest"):
            assert await streams[name].shows("responder org/model-a listening on"), name
        assert await streams["proxy"].shows("<org/model-a> Health check passed")
        assert (await chat(s, ls, "b"))[0] == 200
        assert await streams["upstream"].shows("responder b listening on")
        assert await streams["b"].shows("responder b listening on")
        assert await streams["proxy"].shows("<b> Health check passed")

        for name in ("nope", "org", "p/far", "upstream2"):
            async with s.get(f"{ls.url}/logs/stream/{name}") as r:
                assert r.status == 400, name
                assert await r.json(content_type=None) == {"src": "llama-swap", "error": {
                    "message": INVALID_LOGGER, "type": "invalid_request_error", "param": None, "code": "bad_request"}}
    assert "responder" not in streams["proxy"].text
    assert "[INFO]" not in streams["upstream"].text
    for name in ("org/model-a", "a", "with a rest"):
        assert "responder b" not in streams[name].text and "[INFO]" not in streams[name].text
    assert "responder org/model-a" not in streams["b"].text


async def test_logs_is_the_plain_history_and_browsers_go_to_the_ui(start_llama_swap, upstreams):
    ls = start_llama_swap({"models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/logs") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith(TEXT_PLAIN)
            assert "[INFO] llama-swap listening on" in await r.text()
        async with s.get(ls.url + "/logs", headers={"Accept": "text/html,application/xhtml+xml"},
                         allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/ui/"


async def test_a_log_stream_the_client_leaves_is_logged_with_the_status_and_bytes_it_was_sent(start_llama_swap,
                                                                                              upstreams):
    ls = start_llama_swap({"models": {"m": model(upstreams, "m")}})
    request_line = '"GET /logs/stream/proxy HTTP/1.1"'
    async with aiohttp.ClientSession() as s:
        async with reading(s, ls.url + "/logs/stream/proxy") as stream:
            assert await stream.shows("llama-swap listening on")
        assert await eventually(lambda: request_line in ls.output(), 10)
    logged = re.search(request_line + r" (\d+) (\d+) ", ls.output())
    assert logged and logged.group(1) == "200" and int(logged.group(2)) >= len(stream.data), logged and logged.group(0)


# -- wiring: logToStdout and logTimeFormat -------------------------------------------


@pytest.mark.parametrize("to_stdout, shows_proxy, shows_upstream", [
    ("proxy", True, False), ("upstream", False, True), ("both", True, True), ("none", False, False)])
async def test_log_to_stdout_decides_what_the_mux_and_stdout_get(start_quiet_llama_swap, upstreams,
                                                                  to_stdout, shows_proxy, shows_upstream):
    ls = start_quiet_llama_swap({"logToStdout": to_stdout, "healthCheckTimeout": 30,
                                 "models": {"m": model(upstreams, "m")}})
    proxy_line, upstream_line = "<m> Health check passed", "responder m listening on"
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        # The proxy and upstream logs keep their own history whatever the wiring.
        async with reading(s, ls.url + "/logs/stream/proxy") as proxy:
            assert await proxy.shows(proxy_line)
        async with reading(s, ls.url + "/logs/stream/upstream") as upstream:
            assert await upstream.shows(upstream_line)
        history = await get_text(s, ls.url + "/logs")
        async with reading(s, ls.url + "/logs/stream") as mux:  # the same history, then whatever follows
            assert await eventually(lambda: mux.text.startswith(history), 10), (history, mux.text)
    assert (proxy_line in history) is shows_proxy, history
    assert (upstream_line in history) is shows_upstream, history
    if to_stdout == "none":
        assert history == ""
    ls.stop()
    stdout = ls.output()
    assert (proxy_line in stdout) is shows_proxy, stdout
    assert (upstream_line in stdout) is shows_upstream, stdout
    assert ("shutdown complete" in stdout) is shows_proxy, stdout


LAYOUT_PATTERNS = {
    "rfc3339": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)",
    "kitchen": r"(1[0-2]|[1-9]):[0-5]\d(AM|PM)",
    "stampmilli": r"[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d\.\d{3}",
}


@pytest.mark.parametrize("layout", list(LAYOUT_PATTERNS))
async def test_log_time_format_stamps_proxy_lines_but_never_upstream_output(start_llama_swap, upstreams, layout):
    ls = start_llama_swap({"logToStdout": "both", "logTimeFormat": layout, "healthCheckTimeout": 30,
                           "models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        async with reading(s, ls.url + "/logs/stream/upstream") as upstream:
            assert await upstream.shows("responder m listening on")
        history = await get_text(s, ls.url + "/logs")
    proxy_line = re.compile(rf"^({LAYOUT_PATTERNS[layout]}) \[(DEBUG|INFO|WARN|ERROR)\] ")
    lines = history.splitlines()
    ours = [line for line in lines if not line.startswith(("responder ", "request ", "loading model"))]
    assert len(ours) >= 3 and any("Health check passed" in line for line in ours), history
    assert all(proxy_line.match(line) for line in ours), history
    assert any(line.startswith("responder m listening on http://") for line in lines), history
    assert upstream.text.startswith("responder m starting (pid "), upstream.text
    assert not proxy_line.search(upstream.text) and "[INFO]" not in upstream.text
    assert proxy_line.match(next(line for line in ls.output().splitlines() if "listening on" in line))
    if layout == "rfc3339":
        stamp = datetime.datetime.fromisoformat(proxy_line.match(ours[-1]).group(1))
        assert abs(stamp.timestamp() - time.time()) < 300, ours[-1]


# -- slow readers --------------------------------------------------------------------------


def test_a_full_log_stream_drops_chunks_and_then_says_how_many_bytes_it_missed():
    stream = LogStream(limit=16)  # bytes waiting
    for chunk in (b"one\n", b"two\n", b"three\n"):
        stream.offer(chunk)
    stream.offer(b"lost\n")
    stream.offer(b"gone too\n")
    assert list(stream.chunks) == [b"one\n", b"two\n", b"three\n"]
    stream.size -= len(stream.chunks.popleft())  # as a reader takes it
    stream.offer(b"fits\n")  # it would fit, but once dropping, a stream drops until half is read
    stream.size -= len(stream.chunks.popleft())
    stream.offer(b"four\n")
    assert list(stream.chunks) == [b"three\n", "\n\u2014 19 bytes dropped \u2014\n".encode(), b"four\n"]
    stream.chunks.clear()
    stream.size = 0
    stream.offer(b"five\n")  # the count starts again after it was reported
    assert list(stream.chunks) == [b"five\n"]


def accounted_bytes(text: str) -> int:
    """Bytes a log reader got (markers aside) plus the bytes its markers say it missed."""
    return len(DROP_MARKER.sub("", text).encode()) + sum(int(n) for n in DROP_MARKER.findall(text))


async def test_a_reader_that_does_not_read_slows_nobody_and_costs_bounded_memory(start_llama_swap, upstreams):
    lines, line = 1_200_000, "flood " + "x" * 93  # 100 bytes with its newline: 120 MB written while it starts
    flood = f"sh -c 'yes {line} | head -n {lines}; exec \"$@\"' flood " + upstreams.cmd(name="m")
    ls = start_llama_swap({"healthCheckTimeout": 90, "models": {"m": {"cmd": flood}}})
    pid = ls.proc.pid
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/logs/stream/upstream") as slow, \
                reading(s, ls.url + "/logs/stream/upstream") as fast:
            assert slow.status == 200
            before = memory_kib(pid, "VmRSS")
            request = asyncio.create_task(chat(s, ls, "m"))
            # The fast reader sees the model's server come up after the flood while the slow one
            # has read nothing at all: it was never waited for.
            assert await fast.shows("responder m listening on", 90)
            assert (await request)[0] == 200
            growth_mib = (memory_kib(pid, "VmHWM") - before) / 1024
            assert growth_mib < 60, (f"llama-swap grew by {growth_mib:.0f} MiB while a reader held back "
                                     f"{lines * 100 >> 20} MiB")
            # A busy machine may make even the fast reader miss some, but never without saying so.
            assert accounted_bytes(fast.text) >= lines * 100

            slow_stream = Reader(slow)  # now it reads: what was queued, then a note of what it missed

            async def news_reached_the_slow_reader() -> bool:
                # Lines written while its queue is still full are dropped too: write until one is not.
                assert (await chat(s, ls, "m"))[0] == 200
                return b"request POST /v1/chat/completions" in slow_stream.data
            assert await eventually(news_reached_the_slow_reader, 60, interval=0.2)
            slow_stream.task.cancel()
    text = slow_stream.text
    last = list(DROP_MARKER.finditer(text))[-1]  # (there may be earlier ones: kernel buffers grow as it fills)
    assert text[last.end():].startswith("request POST /v1/chat/completions"), text[last.start():][:300]
    assert text.startswith("flood x")
    assert accounted_bytes(text[:last.end()]) >= lines * 100  # what it got and what it missed: all of it
    assert "responder m listening on" not in text  # written while it was full: dropped, not delayed


# -- /api/events ----------------------------------------------------------------------------


async def test_events_start_with_the_state_of_things_then_follow_a_request(start_llama_swap, upstreams):
    ls = start_llama_swap(side_by_side(upstreams, {
        "m": model(upstreams, "m", "--startup-delay", "1", aliases=["m-alias"]), "b": model(upstreams, "b")},
        peers={"p": {"proxy": "http://127.0.0.1:9", "models": ["far"]}},
        profiles={"coding": {"pins": {"x": "m"}}}))
    async with aiohttp.ClientSession() as s, watching_events(s, ls) as events:
        assert await eventually(lambda: len(events.messages) >= 6, 10)
        first = events.messages[:6]
        assert [t for t, _ in first] == ["logData", "logData", "modelStatus", "uiConfig", "profileChanged", "inflight"]
        assert first[0][1]["source"] == "proxy" and "llama-swap listening on" in first[0][1]["data"]
        assert first[1][1] == {"source": "upstream", "data": ""}
        group = {"name": "all", "swap": False, "exclusive": False, "persistent": False}  # ours, for the UI
        assert first[2][1] == [
            {"id": "b", "name": "", "description": "", "state": "stopped", "unlisted": False, "peerID": "",
             "group": group},
            {"id": "m", "name": "", "description": "", "state": "stopped", "unlisted": False, "peerID": "",
             "aliases": ["m-alias"], "group": group},
            {"id": "p/far", "name": "", "description": "", "state": "", "unlisted": False, "peerID": "p"}]
        assert first[3][1] == {"activity": {"session_id": ["X-Session-ID", "X-Litellm-Session-Id"]}}
        assert first[4][1] == {"active": None}
        assert first[5][1] == {"operation": "snapshot"}  # no `requests` key while there are none

        assert (await chat(s, ls, "m-alias"))[0] == 200
        assert await eventually(lambda: any(d["operation"] == "remove" for d in events.of("inflight")), 10)
        assert await eventually(lambda: any("Health check passed" in d["data"] for d in events.of("logData")), 10)
        later = events.messages[6:]
        m_states = [next(st["state"] for st in data if st["id"] == "m") for t, data in later if t == "modelStatus"]
        # A starting model's status is republished every second (with its load progress).
        changes = [state for i, state in enumerate(m_states) if i == 0 or state != m_states[i - 1]]
        assert changes[:2] == ["starting", "ready"], m_states
        kinds = [(t, data.get("operation") if t == "inflight" else None) for t, data in later]
        upsert, remove = kinds.index(("inflight", "upsert")), kinds.index(("inflight", "remove"))
        ready = next(i for i, (t, data) in enumerate(later)
                     if t == "modelStatus" and next(st for st in data if st["id"] == "m")["state"] == "ready")
        assert upsert < ready < remove, kinds
        request = later[upsert][1]["request"]
        assert request["model"] == "m" and request["req_path"] == "/v1/chat/completions" and request["method"] == "POST"
        assert later[remove][1] == {"operation": "remove", "id": request["id"]}
        logs = [(d["source"], d["data"]) for t, d in later if t == "logData"]
        assert any(src == "upstream" and "loading model..." in text for src, text in logs), logs
        assert any(src == "proxy" and "<m> Health check passed" in text for src, text in logs), logs
        assert all("loading model" not in text for src, text in logs if src == "proxy")

        seen = len(events.messages)
        async with s.put(ls.url + "/api/profiles/active", json={"name": "coding"}) as r:
            assert r.status == 200
        assert await eventually(lambda: {"active": "coding"} in [d for t, d in events.messages[seen:]
                                                                 if t == "profileChanged"], 10)
        async with s.put(ls.url + "/api/profiles/active", json={"name": None}) as r:
            assert r.status == 200
        assert await eventually(lambda: [d for t, d in events.messages[seen:] if t == "profileChanged"]
                                == [{"active": "coding"}, {"active": None}], 10)
        statuses = [d for t, d in events.messages[seen:] if t == "modelStatus"]
        assert statuses and ({st["id"]: st["state"] for st in statuses[-1]}
                             == {"b": "stopped", "m": "ready", "p/far": ""})


async def test_a_second_watcher_gets_the_history_the_first_saw_live(start_llama_swap, upstreams):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        async with watching_events(s, ls) as events:
            assert await eventually(lambda: len(events.messages) >= 6, 10)
            proxy, upstream = events.messages[0][1], events.messages[1][1]
            status = events.messages[2][1]
    assert "<m> Health check passed" in proxy["data"]
    assert upstream["source"] == "upstream" and "responder m listening on" in upstream["data"]
    assert status == [{"id": "m", "name": "", "description": "", "state": "ready", "unlisted": False, "peerID": ""}]


# -- shutdown --------------------------------------------------------------------------------------


async def test_open_streams_do_not_hold_up_shutdown(start_llama_swap, upstreams):
    ls = start_llama_swap({"healthCheckTimeout": 30, "models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        async with reading(s, ls.url + "/logs/stream") as logs, reading(s, ls.url + "/logs/stream/m") as model_log, \
                watching_events(s, ls) as events:
            assert await logs.shows("<m> Health check passed")
            assert await model_log.shows("responder m listening on")
            assert await eventually(lambda: len(events.messages) >= 6, 10)
            began = time.monotonic()
            code = await asyncio.to_thread(ls.stop, signal.SIGTERM, 25)
            took = time.monotonic() - began
            assert code == 0 and took < 10, f"exit status {code} after {took:.1f} s:\n{ls.output()}"
            for stream in (logs, model_log, events):
                assert await eventually(lambda: stream.end is not None, 5), stream.text[-300:]
    assert "shutdown complete" in ls.output()


async def test_starts_stops_and_swaps_are_told_at_the_default_log_level(start_llama_swap, upstreams):
    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {
        "a": {"cmd": upstreams.cmd(name="a")},
        "b": {"cmd": upstreams.cmd("--startup-delay", "1.2", "--load-progress", "dots", name="b")}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        assert (await chat(s, ls, "b"))[0] == 200
        async with s.post(ls.url + "/api/models/unload/b") as r:
            assert r.status == 200
    assert wait_until(lambda: "<b> stopping: unloaded on request" in ls.output(), 10), ls.output()
    lines = ls.output().splitlines()

    def line_index(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, f"{text!r} not logged:\n{ls.output()}"
        return found[0]

    order = [line_index("<a> starting for POST /v1/chat/completions from 127.0.0.1"),
             line_index("<a> ready, loaded in "),
             line_index("<b> starting for POST /v1/chat/completions from 127.0.0.1, stopping a to make room"),
             line_index("<a> stopping: swapped out to make room"),
             line_index("<b> loading: "),
             line_index("<b> ready, loaded in "),
             line_index("<b> stopping: unloaded on request")]
    assert order == sorted(order), ls.output()
    assert not any("[DEBUG]" in line for line in lines)  # all of it at info
    progress = [line for line in lines if "<b> loading: " in line]
    assert 1 <= len(progress) <= 4, progress  # when first known, then a line a quarter


async def test_the_uis_own_reads_are_logged_at_debug_and_a_persons_at_info(in_process, upstreams):
    ls = await in_process({"logLevel": "info", "models": {"m": model(upstreams, "m")}})
    async with aiohttp.ClientSession() as s:
        for path, headers in (("/running", {"X-Llama-Swap-UI": "1"}), ("/api/swaps", {}), ("/ui/", {}),
                              ("/running", {}), ("/v1/models", {})):
            async with s.get(ls.url + path, headers=headers) as r:
                assert r.status == 200
    lines = [line for line in ls.output().splitlines() if "Request 127.0.0.1" in line]
    assert [line.split('"')[1] for line in lines] == ["GET /running HTTP/1.1", "GET /v1/models HTTP/1.1"]
