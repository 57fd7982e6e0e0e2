"""Relaying requests and answers through llama-swap, and its own small endpoints.

Covered: the endpoints, finding the model a request names, rewriting the body (useModelName,
aliases), error envelopes, /v1/models, /running, unload, /upstream passthrough, and relaying
answers (streamed or not) byte for byte.

Every test runs a real llama-swap subprocess in front of real `llama_swap_responder.py` upstreams;
the responder echoes what it received under an `echo` key, so the tests can compare the bytes
the upstream saw with the bytes the client sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import textwrap
import time
from urllib.parse import urlsplit

import aiohttp
import openai
from yarl import URL

from helpers import free_port_block, pid_alive, wait_until

TIMEOUT = aiohttp.ClientTimeout(total=60)


# -- helpers ------------------------------------------------------------------------------------


def config(upstreams, models: dict[str, dict]) -> dict:
    """A config with one responder upstream per model (named after the model) unless cmd is given."""
    out = {}
    for model_id, extra in models.items():
        entry = {"cmd": upstreams.cmd(name=model_id)}
        entry.update(extra)
        out[model_id] = entry
    return {"healthCheckTimeout": 30, "startPort": free_port_block(len(out) + 1), "models": out}


def envelope(message: str, status_type: str = "invalid_request_error", code: str = "not_found") -> str:
    return json.dumps({"src": "llama-swap", "error": {"message": message, "type": status_type, "param": None,
                                                       "code": code}}, separators=(",", ":"))


async def post_json(session: aiohttp.ClientSession, url: str, payload: dict) -> tuple[int, dict]:
    async with session.post(url, json=payload) as r:
        return r.status, await r.json(content_type=None)


async def raw_http(port: int, request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send exact request bytes; return status, headers (lower-cased, last wins) and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0], 16)
                chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await asyncio.wait_for(reader.read(), timeout)
        return status, headers, body
    finally:
        writer.close()


async def running(session: aiohttp.ClientSession, url: str) -> list[dict]:
    async with session.get(url + "/running") as r:
        assert r.status == 200
        return (await r.json())["running"]


async def upstream_port(session: aiohttp.ClientSession, url: str, model: str) -> int:
    entry = next(e for e in await running(session, url) if e["model"] == model)
    return urlsplit(entry["proxy"]).port


def raw_url(url: str) -> URL:
    """A URL sent exactly as written (aiohttp would otherwise re-quote it)."""
    return URL(url, encoded=True)


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return raw[:-2].split(b"\n\n")


CREATED = re.compile(rb'"created": \d+')
ECHO_HEADERS = re.compile(rb'"headers": \{[^{}]*\}')


def normalized_stream(raw: bytes) -> bytes:
    """An SSE answer with what legitimately differs between two identical requests blanked:
    the `created` timestamps and the request headers echoed on the first event."""
    return ECHO_HEADERS.sub(b'"headers": {}', CREATED.sub(b'"created": 0', raw))


# -- 1. the OpenAI SDK -------------------------------------------------------------------------


async def test_openai_sdk_chat_completion_and_stream_are_relayed(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello from a"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.total_tokens == 10

        stream = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"responder_chunks": 4, "responder_delay": 0.01})
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    assert len(chunks) == 5  # 4 content chunks and the final one
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.model == "a" for c in chunks)


# -- 2. streaming: incremental, SSE headers, byte-exact ----------------------------------------


async def test_stream_chunks_arrive_incrementally_with_sse_headers_and_exact_bytes(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    payload = {"model": "a", "stream": True, "responder_chunks": 5, "responder_delay": 0.3,
               "messages": [{"role": "user", "content": "count"}]}
    body = json.dumps(payload).encode()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        # Load the model first so the timings below measure relaying, not the start.
        status, _ = await post_json(s, ls.url + "/v1/chat/completions", {"model": "a"})
        assert status == 200
        arrivals: list[float] = []
        raw = b""
        began = time.monotonic()
        async with s.post(ls.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers.get("X-Accel-Buffering") == "no"
            async for chunk in r.content.iter_any():
                now = time.monotonic() - began
                arrivals += [now] * chunk.count(b"data: ")
                raw += chunk
        # Same request straight to the upstream, for the byte comparison.
        port = await upstream_port(s, ls.url, "a")
        async with s.post(f"http://localhost:{port}/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            direct = await r.read()
            direct_type = r.headers["Content-Type"]

    assert len(arrivals) == 7, raw  # 5 content events, the final one and [DONE]
    assert arrivals[0] < arrivals[-1] - 0.6, arrivals
    assert len(set(round(t, 2) for t in arrivals)) >= 4, f"events were buffered together: {arrivals}"
    assert direct_type.startswith("text/event-stream")

    events, direct_events = sse_events(raw), sse_events(direct)
    assert len(events) == len(direct_events) == 7
    assert events[-1] == direct_events[-1] == b"data: [DONE]"
    # Every event after the first is identical byte for byte except its `created` stamp.
    for got, want in zip(events[1:], direct_events[1:]):
        assert CREATED.sub(b"", got) == CREATED.sub(b"", want)
    # And the whole stream, with the echoed request headers also blanked, is identical.
    assert normalized_stream(raw) == normalized_stream(direct)
    first = json.loads(events[0][len(b"data: "):])
    assert first["echo"]["body"] == body.decode()
    assert first["echo"]["path"] == "/v1/chat/completions"


# -- 3. client disconnect ----------------------------------------------------------------------


async def test_client_disconnect_mid_stream_reaches_the_upstream(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    body = json.dumps({"model": "a", "stream": True, "responder_chunks": 50, "responder_delay": 0.1}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", ls.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    received = b""
    while received.count(b"data: ") < 2:
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        assert chunk, received
        received += chunk
    assert b" 200 " in received.split(b"\r\n", 1)[0]
    writer.close()
    await writer.wait_closed()

    async def events() -> list[str]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.get(ls.url + "/upstream/a/_responder/events") as r:
                assert r.status == 200
                return [e["event"] for e in await r.json()]

    deadline = time.monotonic() + 5
    seen: list[str] = []
    while time.monotonic() < deadline:
        seen = await events()
        if "client_disconnected" in seen:
            break
        await asyncio.sleep(0.1)
    assert "client_disconnected" in seen, seen
    assert "stream_completed" not in seen, seen


# -- 4. useModelName: only the model value changes ---------------------------------------------


async def test_use_model_name_rewrites_only_the_model_value(in_process, upstreams):
    real = "org/Real-Model:Q4_K_M"
    ls = await in_process(config(upstreams, {"a": {"useModelName": real, "aliases": ["a-alias"]}}))
    raw = ('{\n  "zeta" :  1.50e0,\t"messages":[{"role":"user","content":"h\\u00e9llo ✓ — 日本"}] ,\n'
           ' "model"   :   "a"  ,  "alpha": {"nested": {"model": "keep-me"}}, "stream":false }\n')
    expected = raw.replace('"a"', json.dumps(real), 1)
    assert expected != raw
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for requested, body in (("a", raw), ("a-alias", raw.replace('"a"', '"a-alias"', 1))):
            want = body.replace(f'"{requested}"', json.dumps(real), 1)
            assert want == expected
            async with s.post(ls.url + "/v1/chat/completions", data=body.encode(),
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                echo = (await r.json())["echo"]
            assert echo["body"] == want
            assert echo["body_len"] == len(want.encode())
            assert echo["model"] == real
            assert int(echo["headers"]["Content-Length"]) == len(want.encode())


# -- 5. aliases --------------------------------------------------------------------------------


async def test_alias_is_served_by_the_real_model_and_body_keeps_the_alias(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {"aliases": ["gpt-4o-mini", "other"]}}))
    body = b'{"model": "gpt-4o-mini",  "messages": [] }'
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
        assert [e["model"] for e in await running(s, ls.url)] == ["a"]
    assert reply["choices"][0]["message"]["content"] == "hello from a"
    assert reply["echo"]["body"] == body.decode()
    assert reply["echo"]["model"] == "gpt-4o-mini"


# -- 6. error envelopes and the mux's own 404/405 ----------------------------------------------


async def test_an_unknown_model_is_named_with_the_closest_configured_names(in_process, upstreams):
    ls = await in_process(config(upstreams, {"qwen3-8b": {"aliases": ["gpt-4o-mini"]}, "llama3": {},
                                             "secret": {"unlisted": True}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for asked, expected in (("Qwen3-8B", '"Qwen3-8B"; closest configured: qwen3-8b'),
                                ("gpt4o", '"gpt4o"; closest configured: gpt-4o-mini'),
                                ("secrets", '"secrets"; configured: gpt-4o-mini, llama3, qwen3-8b')):
            status, body = await post_json(s, ls.url + "/v1/chat/completions", {"model": asked, "messages": []})
            assert status == 404 and body["error"]["message"] == f"no router for requested model {expected}", body
    assert upstreams.pids() == []


async def test_error_envelopes_and_plain_404_405(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    chat = ls.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(chat, json={"model": "nope", "messages": []}) as r:
            assert r.status == 404
            assert r.headers["Content-Type"].startswith("application/json")
            assert await r.text() == envelope('no router for requested model "nope"; configured: a')

        async with s.post(chat, json={"messages": []}) as r:
            assert r.status == 404
            assert await r.text() == envelope("no model id could be identified")

        # No Content-Type: the body is read as a form, so a JSON body yields no model.
        async with s.post(chat, data=b'{"model":"a"}', skip_auto_headers=["Content-Type"]) as r:
            assert r.status == 404
            assert await r.text() == envelope("no model id could be identified")

        async with s.post(chat, json={"model": "nope"}, headers={"Accept": "text/plain"}) as r:
            assert r.status == 404
            assert r.headers["Content-Type"].startswith("text/plain")
            assert await r.text() == 'llama-swap: no router for requested model "nope"; configured: a'

        async with s.post(chat, json={}, headers={"Accept": "text/plain"}) as r:
            assert r.status == 404
            assert await r.text() == "llama-swap: no model id could be identified"

        for method in ("GET", "POST"):
            async with s.request(method, ls.url + "/no/such/path") as r:
                assert r.status == 404
                assert await r.text() == "404 page not found\n"

        async with s.get(chat) as r:
            assert r.status == 405
            assert "POST" in r.headers["Allow"]
        assert await running(s, ls.url) == []  # nothing above started a model


# -- 7. multipart uploads ----------------------------------------------------------------------


def multipart(boundary: str, parts: list[tuple[str, str | None, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, ctype, payload in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename:
            disp += f'; filename="{filename}"'
        out += disp.encode() + b"\r\n"
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


AUDIO = ("RIFF\x00WAVE héllo\r\n--not-the-boundary\r\n" * 50 + "wörld ✓").encode()


async def test_multipart_upload_is_routed_by_its_model_field_and_forwarded_intact(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}, "w": {"useModelName": "whisper-large-v3"}}))
    url = ls.url + "/v1/audio/transcriptions"
    boundary = "----llamaSwapTestBoundary7MA4YWxkTrZu0gW"
    ctype = f"multipart/form-data; boundary={boundary}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        # A real client's upload (aiohttp's own FormData).
        form = aiohttp.FormData()
        form.add_field("file", AUDIO, filename="clip.wav", content_type="audio/wav")
        form.add_field("model", "a")
        form.add_field("language", "en")
        async with s.post(url, data=form) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
        assert reply["choices"][0]["message"]["content"] == "hello from a"
        assert reply["echo"]["model"] == "a"
        assert reply["echo"]["form_fields"] == [{"name": "file", "filename": "clip.wav"}, {"name": "model"},
                                                {"name": "language"}]
        assert AUDIO.decode() in reply["echo"]["body"]

        # Exact bytes: without useModelName the body reaches the upstream unchanged.
        body = multipart(boundary, [("file", "clip.wav", "audio/wav", AUDIO), ("model", None, None, b"a")])
        async with s.post(url, data=body, headers={"Content-Type": ctype}) as r:
            assert r.status == 200, await r.text()
            echo = (await r.json())["echo"]
        assert echo["body_len"] == len(body)
        assert echo["body"] == body.decode()
        assert echo["content_type"] == ctype

        # A ?model= query parameter wins over the form field.
        async with s.post(url + "?model=a", data=multipart(boundary, [("model", None, None, b"w")]),
                          headers={"Content-Type": ctype}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == "hello from a"

        # useModelName rewrites the model field; the file part is kept.
        body = multipart(boundary, [("file", "clip.wav", "audio/wav", AUDIO), ("model", None, None, b"w"),
                                    ("temperature", None, None, b"0.2")])
        async with s.post(url, data=body, headers={"Content-Type": ctype}) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
        echo = reply["echo"]
        assert reply["choices"][0]["message"]["content"] == "hello from w"
        assert echo["model"] == "whisper-large-v3"
        assert sorted(echo["form_fields"], key=lambda f: f["name"]) == [
            {"name": "file", "filename": "clip.wav"}, {"name": "model"}, {"name": "temperature"}]
        assert AUDIO.decode() in echo["body"]
        if echo["content_type"] == ctype:  # rewritten in place (the Go original rebuilds the form instead)
            assert echo["body"] == body.decode().replace("\r\n\r\nw\r\n", "\r\n\r\nwhisper-large-v3\r\n")


# -- 8. GET routes with ?model= ----------------------------------------------------------------


async def test_get_routes_are_routed_by_the_model_query_parameter(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}, "b": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for path in ("/props", "/v1/audio/voices", "/sdapi/v1/loras"):
            async with s.get(raw_url(ls.url + path + "?model=a&x=%2Fy+z&empty=")) as r:
                assert r.status == 200, await r.text()
                reply = await r.json()
            assert reply["choices"][0]["message"]["content"] == "hello from a"
            echo = reply["echo"]
            assert (echo["method"], echo["path"], echo["query"]) == ("GET", path, "model=a&x=%2Fy+z&empty=")
        async with s.get(ls.url + "/props?model=b") as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "hello from b"
        async with s.get(ls.url + "/props") as r:
            assert r.status == 404
            assert await r.text() == envelope("no model id could be identified")


# -- 9. /v/ and /audioapi/ prefixes ------------------------------------------------------------


async def test_v_and_audioapi_prefixes_are_stripped_from_the_forwarded_path(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for path, forwarded in (("/v/chat/completions", "/chat/completions"), ("/v/embeddings", "/embeddings"),
                                ("/audioapi/v1/tasks/run", "/v1/tasks/run")):
            async with s.post(ls.url + path + "?k=v", json={"model": "a"}) as r:
                assert r.status == 200, await r.text()
                echo = (await r.json())["echo"]
            assert (echo["path"], echo["query"]) == (forwarded, "k=v")


# -- 10. /upstream/<model>/<path> --------------------------------------------------------------


async def test_upstream_passthrough_preserves_method_body_and_encoding(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {"useModelName": "never-used"}, "author": {},
                                             "author/model": {}, "b": {}}))
    binary = bytes(range(256)) * 4
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for method in ("POST", "PUT", "PATCH", "DELETE", "GET"):
            data = binary if method != "GET" else None
            async with s.request(method, raw_url(ls.url + "/upstream/a/api/x%2Fy.bin?q=1"), data=data,
                                 headers={"Content-Type": "application/octet-stream"}) as r:
                assert r.status == 200, await r.text()
                reply = await r.json()
            echo = reply["echo"]
            assert reply["model"] == "a"
            assert (echo["method"], echo["path"], echo["query"]) == (method, "/api/x%2Fy.bin", "q=1")
            assert echo["body_len"] == (len(binary) if data else 0)
            if data:
                assert echo["body"] == binary.decode("utf-8", "replace")

        # No filters on the passthrough: useModelName does not touch the body.
        body = b'{"model":  "whatever", "x": 1}'
        async with s.post(ls.url + "/upstream/a/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert (await r.json())["echo"]["body"] == body.decode()

        # While a is ready, a static path passes through.
        async with s.get(ls.url + "/upstream/a/app.js") as r:
            assert r.status == 200
            assert (await r.json())["echo"]["path"] == "/app.js"

        # Model IDs with slashes: the longest matching prefix wins.
        for path, model, forwarded in (("/upstream/author/model/v1/chat", "author/model", "/v1/chat"),
                                       ("/upstream/author/v1/chat", "author", "/v1/chat"),
                                       ("/upstream/author%2Fmodel/v1/chat", "author/model", "/v1/chat"),
                                       ("/upstream/author/model/", "author/model", "/")):
            async with s.post(raw_url(ls.url + path), json={"k": 1}) as r:
                assert r.status == 200, (path, await r.text())
                reply = await r.json()
            assert (reply["model"], reply["echo"]["path"]) == (model, forwarded), path

        # /upstream/<model> without the slash redirects.
        async with s.get(ls.url + "/upstream/a?x=1", allow_redirects=False) as r:
            assert r.status == 301
            assert r.headers["Location"] == "/upstream/a/?x=1"
        async with s.head(ls.url + "/upstream/a", allow_redirects=False) as r:
            assert r.status == 301
        async with s.post(ls.url + "/upstream/a", data=b"x", allow_redirects=False) as r:
            assert r.status == 308
            assert r.headers["Location"] == "/upstream/a/"
        async with s.get(ls.url + "/upstream/author/model", allow_redirects=False) as r:
            assert r.status == 301
            assert r.headers["Location"] == "/upstream/author/model/"

        async with s.get(ls.url + "/upstream/unknown/v1/models") as r:
            assert r.status == 404
            assert await r.text() == envelope("model not found")

        # A static path for a model that is not loaded: 409, and b is not started.
        pids = len(upstreams.pids())
        for path in ("/upstream/b/app.js", "/upstream/b/static/logo.png",
                     "/upstream/b/x%2Ey.json"):
            async with s.get(raw_url(ls.url + path)) as r:
                assert r.status == 409, path
                assert await r.text() == envelope("model b is not loaded; path matches upstream.ignorePaths",
                                                  code="conflict")
        assert "b" not in [e["model"] for e in await running(s, ls.url)]
        assert len(upstreams.pids()) == pids


async def test_upstream_passthrough_keeps_the_query_string_percent_encoded(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    query = "q=a%20b&path=x%2Fy&amp=%26&plus=1+2"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(raw_url(ls.url + "/upstream/a/api/items?" + query)) as r:
            assert r.status == 200, await r.text()
            echo = (await r.json())["echo"]
        assert (echo["path"], echo["query"]) == ("/api/items", query)
        async with s.get(raw_url(ls.url + "/upstream/a?" + query), allow_redirects=False) as r:
            assert r.status == 301
            assert r.headers["Location"] == "/upstream/a/?" + query


async def test_upstream_root_page_loads_the_model(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/upstream/a/") as r:
            assert r.status == 200
            assert await r.text() == "<html><body>responder a</body></html>"
            assert r.headers["Content-Type"].startswith("text/html")
        assert [(e["model"], e["state"]) for e in await running(s, ls.url)] == [("a", "ready")]


async def test_head_through_upstream_keeps_the_upstream_content_length(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/upstream/a/") as r:
            assert r.status == 200
            page = await r.read()
        port = await upstream_port(s, ls.url, "a")
        async with s.head(f"http://127.0.0.1:{port}/", allow_redirects=False) as direct:
            assert direct.status == 200
            expected = direct.headers.get("Content-Length")
        assert expected == str(len(page))
        async with s.head(ls.url + "/upstream/a/", allow_redirects=False) as proxied:
            assert proxied.status == 200
            assert proxied.headers.get("Content-Length") == expected, dict(proxied.headers)
            assert await proxied.read() == b""


# -- 11. /v1/models, /running, /health, /, unload ----------------------------------------------


async def test_models_list_running_health_root_and_unload(in_process, upstreams):
    cfg = config(upstreams, {"b": {"name": "  Bee  ", "description": " the b model ", "ttl": 300},
                             "a": {"aliases": ["alpha", "first"]},
                             "hidden": {"unlisted": True}})
    ls = await in_process(cfg)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/v1/models", headers={"Origin": "http://example.test"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/json")
            assert r.headers["Access-Control-Allow-Origin"] == "http://example.test"
            text = await r.text()
        assert text.endswith("}\n")
        listing = json.loads(text)
        assert list(listing) == ["object", "data"] and listing["object"] == "list"
        a, b = listing["data"]
        assert (a["id"], b["id"]) == ("a", "b")
        assert list(a) == ["id", "object", "created", "owned_by", "meta", "status"]
        assert list(b) == ["id", "object", "created", "owned_by", "name", "description", "meta", "status"]
        assert a["object"] == b["object"] == "model"
        assert a["owned_by"] == b["owned_by"] == "llama-swap"
        assert isinstance(a["created"], int) and a["created"] == b["created"]
        assert abs(a["created"] - time.time()) < 60
        assert (b["name"], b["description"]) == ("Bee", "the b model")
        assert a["meta"] == {"llamaswap": {"type": "model", "aliases": ["alpha", "first"]}}
        assert b["meta"] == {"llamaswap": {"type": "model"}}
        assert a["status"] == b["status"] == {"value": "unloaded"}

        async with s.get(ls.url + "/models") as r:
            assert "Access-Control-Allow-Origin" not in r.headers
            assert [m["id"] for m in (await r.json())["data"]] == ["a", "b"]

        async with s.get(ls.url + "/running") as r:
            assert r.headers["Content-Type"].startswith("application/json")
            assert await r.text() == '{"running":[]}\n'

        # The unlisted model still serves requests.
        status, reply = await post_json(s, ls.url + "/v1/chat/completions", {"model": "hidden"})
        assert status == 200 and reply["model"] == "hidden"
        status, reply = await post_json(s, ls.url + "/v1/chat/completions", {"model": "b"})
        assert status == 200 and reply["model"] == "b"

        async with s.get(ls.url + "/v1/models") as r:
            statuses = {m["id"]: m["status"]["value"] for m in (await r.json())["data"]}
        assert statuses == {"a": "unloaded", "b": "loaded"}

        entries = await running(s, ls.url)
        assert len(entries) == 1
        entry = entries[0]
        # The original's fields in its order, then ours (for the UI): in_flight, ttl_remaining, queued.
        assert list(entry) == ["model", "state", "cmd", "proxy", "ttl", "name", "description",
                               "in_flight", "ttl_remaining", "queued"]
        port = urlsplit(entry["proxy"]).port
        assert entry["name"].strip() == "Bee" and entry["description"].strip() == "the b model"
        assert {k: entry[k] for k in ("model", "state", "cmd", "proxy", "ttl")} == {
            "model": "b", "state": "ready", "cmd": cfg["models"]["b"]["cmd"].replace("${PORT}", str(port)),
            "proxy": f"http://localhost:{port}", "ttl": 300}
        assert port == cfg["startPort"] + 1  # ports follow model-ID order: a, b, hidden

        async with s.get(ls.url + "/health") as r:
            assert (r.status, await r.text()) == (200, "OK")
        async with s.get(ls.url + "/", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/ui"

        async with s.post(ls.url + "/api/models/unload/unknown") as r:
            assert r.status == 404
            assert await r.text() == envelope("model not found")

        pid = upstreams.pids()[-1]
        assert pid_alive(pid)
        async with s.get(ls.url + "/unload") as r:
            assert (r.status, await r.text()) == (200, "OK")
        assert not pid_alive(pid)
        assert await running(s, ls.url) == []

        # Unload one model by alias, and the JSON unload-all.
        status, _ = await post_json(s, ls.url + "/v1/chat/completions", {"model": "alpha"})
        assert status == 200
        assert [e["model"] for e in await running(s, ls.url)] == ["a"]
        async with s.post(ls.url + "/api/models/unload/alpha") as r:
            assert (r.status, await r.text()) == (200, "OK")
        assert await running(s, ls.url) == []
        async with s.post(ls.url + "/api/models/unload/a") as r:  # already stopped: a no-op
            assert (r.status, await r.text()) == (200, "OK")
        async with s.post(ls.url + "/api/models/unload") as r:
            assert r.status == 200
            assert await r.text() == '{"msg":"ok"}\n'
    assert wait_until(lambda: not upstreams.alive(), 5)


# -- 12. upstream errors pass through -----------------------------------------------------------


async def test_upstream_error_status_and_body_pass_through_unchanged(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "a", "responder_status": 418}) as r:
            assert r.status == 418
            assert r.headers["Content-Type"].startswith("application/json")
            reply = await r.json()
        assert reply["choices"][0]["message"]["content"] == "hello from a"
        assert reply["echo"]["model"] == "a"
        assert "src" not in reply

        async with s.post(ls.url + "/v1/chat/completions",
                          json={"model": "a", "responder_status": 503, "stream": True, "responder_chunks": 2}) as r:
            assert r.status == 503
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        assert sse_events(raw)[-1] == b"data: [DONE]"
        assert len(sse_events(raw)) == 4


# -- 13. headers ---------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_dropped_and_forwarded_for_is_set(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}}))
    body = b'{"model":"a"}'

    def request(extra: str) -> bytes:
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{ls.port}\r\n"
                "Content-Type: application/json\r\n"
                "Connection: keep-alive, X-Custom-Hop\r\nX-Custom-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                "X-Custom-Other: kept\r\nAuthorization: Bearer sk-secret\r\nUser-Agent: relay-test/1.0\r\n"
                f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body

    status, headers, raw = await raw_http(ls.port, request(""))
    assert status == 200, raw
    seen = {k.lower(): v for k, v in json.loads(raw)["echo"]["headers"].items()}
    assert "x-custom-hop" not in seen
    assert "keep-alive" not in seen
    assert seen.get("connection", "").lower() in ("", "keep-alive", "close")
    assert seen["x-custom-other"] == "kept"
    assert seen["authorization"] == "Bearer sk-secret"
    assert seen["user-agent"] == "relay-test/1.0"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["content-type"] == "application/json"

    status, headers, raw = await raw_http(ls.port, request("X-Forwarded-For: 10.1.2.3\r\n"))
    assert status == 200, raw
    seen = {k.lower(): v for k, v in json.loads(raw)["echo"]["headers"].items()}
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


# -- 14. the model after a big messages array ------------------------------------------------------


async def test_model_after_a_12_mb_messages_array_is_found_quickly(in_process, upstreams):
    ls = await in_process(config(upstreams, {"a": {}, "b": {}}))
    blob = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0MTIzNDU2Nzg5K/=" * 250_000)[:12 * 1024 * 1024].decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                             {"type": "image_url",
                                              "image_url": {"url": "data:image/png;base64," + blob}}]},
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


# -- an upstream that closes a kept-alive connection after a stream ---------------------------------

UPSTREAM_SCRIPT = r'''
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ANSWER

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def upstream_script(answer: str) -> str:
    """A plain HTTP/1.1 upstream on the port in argv[1]: a GET gets "ok" (its health check); a POST
    has its body read, then `answer`, the rest of its handler, runs."""
    return UPSTREAM_SCRIPT.replace("ANSWER\n", textwrap.indent(textwrap.dedent(answer), " " * 8).lstrip())


CLOSES_AFTER_STREAMS = upstream_script(r'''
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Transfer-Encoding", "chunked")
    self.send_header("Keep-Alive", "timeout=5, max=100")  # as llama-server says, and then closes
    self.end_headers()
    for event in (b"data: {}\n\n", b"data: [DONE]\n\n"):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
    self.wfile.write(b"0\r\n\r\n")
    time.sleep(0.2)  # the close comes a moment after the answer, once the connection is back in the pool
    self.close_connection = True
''')


async def test_a_request_right_after_a_stream_is_sent_again_when_the_upstream_closed_the_connection(
        in_process, upstreams, tmp_path):
    """llama-server closes a connection right after a streamed answer while saying keep-alive:
    the next request on it must go out again on a fresh connection, not end in a 502."""
    script = tmp_path / "closes_after_streams.py"
    script.write_text(CLOSES_AFTER_STREAMS)
    ls = await in_process({"models": {"m": {"cmd": f"{sys.executable} {script} ${{PORT}}"}}})
    async with aiohttp.ClientSession() as s:
        for _ in range(6):  # back to back, as an agent's tool loop sends them
            async with s.post(ls.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
                assert r.status == 200, await r.text()
                assert (await r.read()).endswith(b"data: [DONE]\n\n")


def first_reads(port: int, request: bytes, times: int) -> list[bytes]:
    """What a blocking client's first recv() gets for each of `times` requests on one connection:
    it is woken by the first segment that arrives."""
    reads = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(times):
            sock.sendall(request)
            got = sock.recv(65536)
            reads.append(got)
            length = int(re.search(rb"(?i)content-length: *(\d+)", got)[1])
            while len(got) < got.index(b"\r\n\r\n") + 4 + length:
                got += sock.recv(65536)
    return reads


async def test_an_answer_of_known_length_leaves_in_one_write_with_its_headers(start_llama_swap, upstreams):
    """Headers and body of a small answer with a Content-Length go out together, as Go's server
    sends them, not as two segments (a second send and a second wake of the client per request).
    A stream's headers still go at once: test_stream_chunks_arrive_incrementally... above."""
    ls = start_llama_swap(config(upstreams, {"a": {}}))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await post_json(s, ls.url + "/v1/chat/completions", {"model": "a"}))[0] == 200
    body = b'{"model": "a", "messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    reads = await asyncio.to_thread(first_reads, ls.port, request, 20)
    split = [r for r in reads if not r.endswith(b"}")]
    assert not split, f"{len(split)} of 20 answers came as headers first, body later: {split[0]!r}"


BREAKS_OFF_BEFORE_THE_BODY = upstream_script('''
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", "100")
    self.end_headers()
    self.wfile.flush()
    self.close_connection = True  # and not one byte of the 100
''')


async def test_an_answer_cut_before_its_first_byte_still_reaches_the_client_as_a_cut_answer(in_process, tmp_path):
    """The headers of an answer of known length wait for its first bytes; when the upstream
    breaks off before any, the client still gets them, then the cut: not a connection closed
    without a word, which a client (or a peer in front) may take for a request never received."""
    script = tmp_path / "breaks_off.py"
    script.write_text(BREAKS_OFF_BEFORE_THE_BODY)
    ls = await in_process({"models": {"m": {"cmd": f"{sys.executable} {script} ${{PORT}}"}}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(2):
            async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
                assert r.status == 200 and r.headers["Content-Length"] == "100"
                try:
                    await r.read()
                    raise AssertionError("a body of 100 bytes was cut at 0, and the client was not told")
                except aiohttp.ClientPayloadError:
                    pass
