"""Heavy and hostile input never stalls or bloats the proxy (issue 16).

llama-swap-py serves every client, stream and health check from one event loop, so a request
that blocks it for a second delays everyone by a second. Each test here sends what an attack
probe sent (at the size limits) while a LoopProber asks /health every 50 ms from a process of
its own: no answer may take STALL_LIMIT or longer. Where memory was the problem, the proxy's
peak RSS (VmHWM) is held to a bound too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import threading
import types
import urllib.request
import zlib
from pathlib import Path

import aiohttp

from helpers import PY, ROOT, LoopProber, free_port, wait_until

TIMEOUT = aiohttp.ClientTimeout(total=300)
MB = 1024 * 1024


def config(upstreams, limit_mb: int = 64, **model) -> dict:
    return {"healthCheckTimeout": 15, "maxRequestBodyMB": limit_mb, "performance": {"disabled": True},
            "models": {"m": {"cmd": upstreams.cmd(name="m"), **model}}}


def peak_rss(ls) -> int:
    """The proxy's peak resident memory so far, in bytes."""
    with open(f"/proc/{ls.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


async def post(session: aiohttp.ClientSession, url: str, body: bytes, content_type: str = "application/json",
               **headers: str) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers={"Content-Type": content_type, **headers}) as r:
        return r.status, await r.read()


async def warm(session: aiohttp.ClientSession, ls) -> None:
    """The model started before the probe: a start is not what is measured."""
    async with session.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
        assert r.status == 200


# -- 1. JSON edits are linear -----------------------------------------------------------------------


async def test_filters_and_use_model_name_on_bodies_full_of_duplicate_keys_do_not_stall(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams, useModelName="upstream-name",
                                 filters={"stripParams": "stop, user", "setParams": {"max_tokens": 64}}))
    copies = 40_000
    body = ('{"model":"m",' + '"stop":"x","max_tokens":9999,"model":"m",' * copies + '"user":"u"}').encode()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        with LoopProber(ls):
            status, raw = await post(s, ls.url + "/v1/chat/completions", body)
    assert status == 200, raw[:500]
    sent = json.loads(raw)["echo"]["body"]
    assert '"stop"' not in sent and '"user"' not in sent
    assert sent.count('"max_tokens":64') == copies and "9999" not in sent
    assert sent.count('"model":"upstream-name"') == copies + 1 and '"model":"m"' not in sent


# -- 2. finding the model ----------------------------------------------------------------------------


async def test_finding_the_model_in_crafted_bodies_at_the_size_limit_does_not_stall(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams))
    boundary = "B0undary"
    tiny_part = f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\ny\r\n".encode()
    bodies = {
        "commas": (b'{' + b"," * (60 * MB) + b'"model":"m"}', "application/json"),
        "brackets": (b'{"a":[' + b"[]," * (20 * MB) + b'[]],"model":"m"}', "application/json"),
        "one long string": (b'{"a":"' + b"x" * (60 * MB) + b'","model":"m"}', "application/json"),
        "escapes": (b'{"a":"' + b'\\"' * (30 * MB) + b'","model":"m"}', "application/json"),
        "multipart": (tiny_part * ((60 * MB) // len(tiny_part)) + f"--{boundary}\r\nContent-Disposition: form-data; "
                      f"name=\"model\"\r\n\r\nm\r\n--{boundary}--\r\n".encode(),
                      f"multipart/form-data; boundary={boundary}"),
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        with LoopProber(ls):
            for label, (body, content_type) in bodies.items():
                status, raw = await post(s, ls.url + "/v1/chat/completions", body, content_type)
                assert status == 200, (label, status, raw[:300])
                assert json.loads(raw)["model"] == "m", label


async def test_a_url_encoded_form_past_10_mb_is_not_parsed(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        before = peak_rss(ls)
        with LoopProber(ls):
            status, raw = await post(s, ls.url + "/v1/audio/transcriptions", b"a=b&" * (12 * MB) + b"model=m",
                                     "application/x-www-form-urlencoded")
            assert status == 413, raw[:300]
            assert "10 MB" in json.loads(raw)["error"]["message"]
            status, raw = await post(s, ls.url + "/v1/chat/completions", b"a=b&" * (2 * MB) + b"model=m",
                                     "application/x-www-form-urlencoded")
            assert status == 200 and json.loads(raw)["model"] == "m", raw[:300]
    assert peak_rss(ls) - before < 400 * MB  # the form's size a few times over, never its pairs as objects


# -- 3. compressed bodies ----------------------------------------------------------------------------


async def test_gzip_bombs_are_refused_early_without_stalling_or_bloating(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams, limit_mb=64))
    bomb = gzip.compress(b"\0" * (1024 * MB), 9)  # about 1 MB that inflates to 1 GiB
    deflate_bomb = zlib.compress(b"{" * (512 * MB), 9)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        before = peak_rss(ls)
        with LoopProber(ls):
            answers = await asyncio.gather(*(post(s, ls.url + "/v1/chat/completions", bomb,
                                                  **{"Content-Encoding": "gzip"})
                                             for _ in range(4)),
                                           post(s, ls.url + "/v1/chat/completions", deflate_bomb,
                                                **{"Content-Encoding": "deflate"}))
        for status, raw in answers:
            assert status == 413, raw[:300]
            assert "maxRequestBodyMB" in json.loads(raw)["error"]["message"] or "ratio" in raw.decode()
    assert peak_rss(ls) - before < 300 * MB


async def test_a_compressed_body_within_the_limit_still_arrives_whole(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams, limit_mb=64))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hello " * 200_000}]}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress),
                                 ("deflate", lambda data: zlib.compress(data)[2:-4])):  # raw deflate too
            status, raw = await post(s, ls.url + "/v1/chat/completions", compress(json.dumps(payload).encode()),
                                     **{"Content-Encoding": coding})
            assert status == 200, (coding, raw[:300])
            assert json.loads(json.loads(raw)["echo"]["body"]) == payload
        status, raw = await post(s, ls.url + "/v1/chat/completions", b"{}", **{"Content-Encoding": "br"})
        assert status == 415 and "gzip" in json.loads(raw)["error"]["message"], raw


# -- 4. /upstream paths ------------------------------------------------------------------------------


async def test_a_long_upstream_path_is_looked_up_without_stalling(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams))
    path = "/upstream/" + "a/" * 7_000 + "x"  # 14 KB, 7,000 segments: the request line's limit is 16 KiB
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        with LoopProber(ls):
            # One at a time: aiohttp's own router walks such a path in time quadratic in its length
            # (a few ms here, ~25 ms on a slow machine), which concurrent clients would add up. Our
            # lookup took 0.3 s or more for each before it stopped at the longest model name.
            for _ in range(12):
                async with s.get(ls.url + path) as r:
                    assert r.status == 404
        async with s.get(ls.url + "/upstream/m/_responder/info") as r:  # and a real one still resolves
            assert r.status == 200
        assert upstreams.pids(), "the real path started the model"


# -- 5. a stdout nobody reads --------------------------------------------------------------------


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def test_a_stdout_nobody_reads_never_stops_the_proxy(tmp_path, upstreams):
    # Under systemd or docker a stuck log pipe is a pipe nobody reads: 64 KiB fill it.
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({**config(upstreams), "startPort": free_port()}))  # JSON is YAML
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "llama_swap", "--config", str(path), "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = bytearray()
    try:
        assert wait_until(lambda: health(port), 30), "llama-swap did not start"
        padding = "x" * 8000  # every request is a line of our access log, with its User-Agent
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            with LoopProber(types.SimpleNamespace(port=port)):
                for _ in range(600):  # 4.8 MB of log: past the 4 MiB held for a stdout that is not read
                    async with s.get(f"http://127.0.0.1:{port}/health", headers={"User-Agent": padding}) as r:
                        assert r.status == 200
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m"}) as r:
                    assert r.status == 200
            def read() -> None:
                while chunk := proc.stdout.read1(65536):
                    seen.extend(chunk)
            reader = threading.Thread(target=read, daemon=True)
            reader.start()  # reading again: what was held comes out, then what was dropped is told
            for _ in range(20):
                async with s.get(f"http://127.0.0.1:{port}/health", headers={"User-Agent": "after-reading"}) as r:
                    assert r.status == 200
                await asyncio.sleep(0.1)
            assert wait_until(lambda: b'"after-reading"' in seen, 30), bytes(seen[-500:])
            assert b"bytes of log output were dropped: stdout was not being read" in seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert wait_until(lambda: b"shutdown complete" in seen, 10)


# -- 6. websocket messages ---------------------------------------------------------------------------


async def test_a_websocket_message_past_the_body_limit_closes_the_socket_with_1009(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams, limit_mb=1))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.ws_connect(ls.url + "/upstream/m/ws", max_msg_size=0) as ws:
            await ws.send_str("small")
            assert await ws.receive_str(timeout=10) == "echo: small"
            await ws.send_bytes(b"x" * (2 * MB))
            message = await ws.receive(timeout=30)
            assert (message.type == aiohttp.WSMsgType.CLOSE
                    and message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG), message
        before = peak_rss(ls)
        async with s.ws_connect(ls.url + "/upstream/m/ws", max_msg_size=0) as ws:
            with contextlib.suppress(ConnectionError):  # the proxy hangs up in the middle of it
                await ws.send_bytes(b"x" * (256 * MB))
        assert peak_rss(ls) - before < 32 * MB  # refused as it came, never held whole
        async with s.ws_connect(ls.url + "/upstream/m/ws") as ws:  # and the next socket works
            await ws.send_str("again")
            assert await ws.receive_str(timeout=10) == "echo: again"


# -- 7. /api/events --------------------------------------------------------------------------------


async def test_in_flight_events_stay_small_and_a_watcher_that_stops_reading_is_dropped(start_llama_swap, upstreams):
    ls = start_llama_swap(config(upstreams))
    big_headers = {f"X-Big-{i}": "v" * 8_000 for i in range(100)}  # 800 KB (the responder takes 8 KB a header)

    async def hundred_requests() -> None:
        for _ in range(100):
            async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}, headers=big_headers) as answer:
                assert answer.status == 200
                await answer.read()  # so that the connection is used again, as a client's would be

    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        # The same requests without a watcher first: the memory relaying 800 KB of headers takes
        # at its peak (copies, allocator arenas) is counted before the watchers come.
        await hundred_requests()
        reader, writer = await asyncio.open_connection("127.0.0.1", ls.port)  # a watcher that never reads
        writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        async with s.get(ls.url + "/api/events") as r:  # one that reads, to make the events happen
            await r.content.readline()
            before = peak_rss(ls)
            await hundred_requests()  # some 30 MB of in-flight events (headers cut to 1 KB each)
            async with s.get(ls.url + "/api/inflight") as inflight:
                assert inflight.status == 200
        # Two watchers' queues of 4 MB at most; were the events kept for them, 20 MB and more.
        assert peak_rss(ls) - before < 16 * MB, "events grew with the headers"
        # The one that stopped reading fell behind and was dropped: its connection ends.
        received = 0
        async with asyncio.timeout(30) if hasattr(asyncio, "timeout") else contextlib.nullcontext():
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
        writer.close()
        # And what a request's entry shows of a long header is its start and length.
        async with s.post(ls.url + "/v1/chat/completions", headers=big_headers,
                          json={"model": "m", "stream": True, "responder_chunks": 20,
                                "responder_delay": 0.1}) as answer:
            await answer.content.readany()
            async with s.get(ls.url + "/api/inflight") as inflight:
                [entry] = (await inflight.json())["requests"]
            await answer.read()
    assert entry["req_headers"]["X-Big-7"] == "v" * 1024 + "... (8000 characters)"


# -- 8. a client that never reads ---------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_hung_up_on_and_frees_its_model(start_llama_swap, upstreams):
    ls = start_llama_swap({**config(upstreams), "stalledClientTimeout": 2, "models": {
        "a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}}})  # one swap group
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "a"}) as r:
            assert r.status == 200
        body = json.dumps({"model": "a", "stream": True, "responder_bytes": 512 * MB}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", ls.port)  # asks for 512 MB, reads none of it
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await asyncio.sleep(1)
        began = asyncio.get_running_loop().time()
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "b"}) as r:  # waits for a to be free
            assert r.status == 200 and (await r.json())["model"] == "b"
        waited = asyncio.get_running_loop().time() - began
        writer.close()
    assert waited < 20, waited
    # Its stdout is written by a thread of its own, so the line may come a moment after b's answer.
    assert ls.wait_for("the client took nothing of its answer for 2s, hanging up (stalledClientTimeout)", 10), \
        ls.output()


# -- 9. open files ---------------------------------------------------------------------------------


def started_with_open_files(tmp_path, upstreams, soft: int, hard: int) -> tuple[subprocess.Popen, int, Path]:
    import resource

    path, log = tmp_path / "config.yaml", tmp_path / "out.log"
    path.write_text(json.dumps({**config(upstreams), "startPort": free_port()}))
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "llama_swap", "--config", str(path), "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    assert wait_until(lambda: health(port), 30), log.read_text()
    return proc, port, log


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path, upstreams):
    proc, port, log = started_with_open_files(tmp_path, upstreams, 1024, 4096)  # what systemd gives
    try:
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    finally:
        stop(proc)


async def test_running_out_of_file_descriptors_is_one_warning_and_passes(tmp_path, upstreams):
    proc, port, log = started_with_open_files(tmp_path, upstreams, 80, 80)
    held = []
    try:
        for _ in range(120):  # more connections than descriptors
            with contextlib.suppress(OSError):
                held.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5))
        assert wait_until(lambda: "cannot accept new connections" in log.read_text(), 10), log.read_text()
        await asyncio.sleep(2.5)  # asyncio retries every second: still one line
        for _reader, writer in held:
            writer.close()
        held.clear()
        await asyncio.sleep(1)  # (the loop closes them)
        assert wait_until(lambda: health(port), 15), "no connection accepted once some closed"
    finally:
        for _reader, writer in held:
            writer.close()
        stop(proc)
    output = log.read_text()
    assert output.count("cannot accept new connections: Too many open files (the limit is 80)") == 1, output
    assert "Traceback" not in output and "socket.accept() out of system resource" not in output, output


# -- 10. shutdown ----------------------------------------------------------------------------------


async def test_sigterm_during_a_long_stream_ends_it_after_30_s_then_gives_each_model_its_unload_time(
        start_llama_swap, upstreams, tmp_path):
    stopped = tmp_path / "cmdstop-finished"
    ls = start_llama_swap({**config(upstreams), "unloadTimeout": 10, "models": {
        "slow-to-stop": {"cmd": upstreams.cmd("--sigterm-delay", "3", name="slow-to-stop")},
        "docker-like": {"cmd": upstreams.cmd(name="docker-like"),
                        "cmdStop": f"sh -c 'sleep 2; kill ${{PID}}; touch {stopped}'"}},
        "groups": {"all": {"swap": False, "exclusive": False, "members": ["slow-to-stop", "docker-like"]}}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "docker-like"}) as r:
            assert r.status == 200
        async with s.post(ls.url + "/v1/chat/completions", json={
                "model": "slow-to-stop", "stream": True, "responder_chunks": 100_000, "responder_delay": 0.05}) as r:
            await r.content.readline()  # streaming, and far from done
            began = asyncio.get_running_loop().time()
            ls.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(aiohttp.ClientError):
                await r.read()
        assert await asyncio.to_thread(ls.proc.wait, 60) == 0
        took = asyncio.get_running_loop().time() - began
    output = ls.output()
    assert 29 < took < 45, (took, output[-2000:])  # 30 s for the stream, then 3 s and 2 s side by side
    assert "SIGKILL" not in output, output[-2000:]
    assert stopped.exists(), "cmdStop was killed before it finished"


# -- 11. how long a request waits ------------------------------------------------------------------------


async def test_a_request_waits_for_its_model_no_longer_than_queue_timeout(start_llama_swap, upstreams):
    ls = start_llama_swap({**config(upstreams),
                           "routing": {"scheduler": {"settings": {"fifo": {"queueTimeoutMs": 1500}}}},
                           "models": {"m": {"cmd": upstreams.cmd("--startup-delay", "8", name="m")}}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        began = asyncio.get_running_loop().time()
        status, raw = await post(s, ls.url + "/v1/chat/completions", json.dumps({"model": "m"}).encode())
        waited = asyncio.get_running_loop().time() - began
        assert status == 503, raw
        assert "m was not ready for this request within 1.5s (queueTimeoutMs)" in json.loads(raw)["error"]["message"]
        assert 1.4 < waited < 6, waited
        status, raw = await post(s, ls.url + "/v1/chat/completions",
                                 json.dumps({"model": "m"}).encode())  # the load went on
        assert status in (200, 503), raw


# -- 12. other web pages ---------------------------------------------------------------------------


async def test_another_sites_page_cannot_change_anything_here(start_llama_swap, upstreams):
    ls = start_llama_swap({**config(upstreams), "allowedOrigins": ["http://dash.lan:3000"]})
    ours = f"http://127.0.0.1:{ls.port}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await warm(s, ls)
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "http://localhost:3000"}, {"Origin": "null"}):
            for method, path in (("POST", "/api/models/unload"), ("POST", "/api/config/reload"),
                                 ("POST", "/api/inflight/1/cancel"), ("POST", "/api/models/load/m")):
                async with s.request(method, ls.url + path, headers=headers) as r:
                    assert r.status == 403, (method, path, headers)
                    assert "may not change anything here" in (await r.json())["error"]["message"]
        async with s.get(ls.url + "/unload", headers={"Sec-Fetch-Site": "cross-site"}) as r:  # an <img src=...>
            assert r.status == 403
        assert [e["model"] for e in (await (await s.get(ls.url + "/running")).json())["running"]] == ["m"]
        # Our own pages, an allowed origin, and anything that is no browser (curl, scripts) may.
        for headers in ({"Origin": ours}, {"Origin": "http://dash.lan:3000"}, {}):
            async with s.post(ls.url + "/api/models/unload", headers=headers) as r:
                assert r.status == 200, headers
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"},
                          headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 200  # the API itself stays open to browsers, as the original's CORS says


async def test_without_keys_a_rebound_name_reads_nothing(start_llama_swap, upstreams):
    ls = start_llama_swap({**config(upstreams), "allowedOrigins": ["https://llm.example.com"]})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{ls.port}", "127.0.0.1.nip.io"):
            for path in ("/api/captures/1", "/running", "/v1/models", "/logs"):
                async with s.get(ls.url + path, headers={"Host": host}) as r:
                    assert r.status == 403, (host, path)
                    assert "DNS rebinding" in (await r.json())["error"]["message"]
        for host in (f"127.0.0.1:{ls.port}", f"localhost:{ls.port}", f"[::1]:{ls.port}", "gpubox", "gpubox.local",
                     "llm.example.com", "llm.example.com:443"):
            async with s.get(ls.url + "/running", headers={"Host": host}) as r:
                assert r.status == 200, host
        async with s.get(ls.url + "/health", headers={"Host": "rebind.attacker.example"}) as r:
            assert r.status == 200  # a monitor's probe, whatever it calls us
    keyed = start_llama_swap({**config(upstreams), "apiKeys": ["k"]})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:  # with keys, the key is the guard
        async with s.get(keyed.url + "/running",
                         headers={"Host": "llm.other.example", "Authorization": "Bearer k"}) as r:
            assert r.status == 200
