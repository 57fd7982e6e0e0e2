"""Bad input is refused cleanly (issue 9): what a client gets wrong, by mistake or on purpose,
is answered with a 4xx (a llama-swap envelope on the API), never a 5xx or a traceback, and the
server goes on serving.

Covered: bodies no model can be read from (malformed, truncated and non-object JSON, non-UTF-8,
NUL bytes, undecodable gzip), broken multipart forms, model names with control characters or
path separators, forged log lines through anything a client sends, header values that are not
UTF-8, a client leaving the event stream, bodies past maxRequestBodyMB (chunked or not),
gzip-encoded request bodies, path traversal and open redirects under /ui/ and /upstream/,
oversized request lines and headers, and HTTP/1.1 request smuggling.

Every test runs a real llama-swap in front of a real `llama_swap_responder.py` upstream; the
framing tests write exact bytes to a raw socket, so no client library tidies them first.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from helpers import ROOT, chat, eventually, running

TIMEOUT = aiohttp.ClientTimeout(total=60)
NO_MODEL = "no model id could be identified"
FORGED = "[INFO] forged"
# Text that only the files themselves contain: seeing it in a reply means the file was served.
PROXY_SOURCE_MARK = b"class ProxyLog:"
PASSWD_MARK = b"root:x:0:0:"


# -- helpers ------------------------------------------------------------------------------------


def config(upstreams) -> dict:
    # No performance sampler: here it only costs CPU, and it logs at moments of its own.
    return {"healthCheckTimeout": 15, "maxRequestBodyMB": 1, "performance": {"disabled": True},
            "models": {"m": {"cmd": upstreams.cmd(name="m")}}}


def assert_refused(status: int, raw: bytes, message: str | None = None, what: str = "") -> None:
    """A 4xx llama-swap envelope, with exactly `message` when one is given; `what` names the
    request in a failure."""
    assert 400 <= status < 500, f"{what}: {status} {raw[:500]!r}"
    try:
        body = json.loads(raw)
    except ValueError:
        raise AssertionError(f"{what}: {status} without a JSON envelope: {raw[:500]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and body.get("src") == "llama-swap", f"{what}: {body}"
    assert set(error) == {"message", "type", "param", "code"} and error["param"] is None, f"{what}: {body}"
    if message is not None:
        assert error["message"] == message, f"{what}: {body}"


async def send(session: aiohttp.ClientSession, method: str, url: str | URL, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with session.request(method, url, data=body or None, headers=headers, allow_redirects=False) as r:
        return r.status, await r.read()


async def settled_output(session: aiohttp.ClientSession, ls) -> str:
    """The proxy's output once everything before it is logged, and proof that it still serves:
    a /health request with a unique User-Agent goes last, and its access line is waited for."""
    tag = f"checkpoint-{uuid.uuid4().hex}"
    async with session.get(ls.url + "/health", headers={"User-Agent": tag}) as r:
        assert r.status == 200
    assert await eventually(lambda: tag in ls.output(), 10), ls.output()[-3000:]
    return ls.output()


def assert_no_traceback(output: str) -> None:
    first = output.find("Traceback (most recent call last)")
    assert first == -1, output[max(0, first - 2000):first + 4000]


def forged_lines(output: str) -> list[str]:
    """Lines that begin with the forged prefix. splitlines() breaks at every character a
    terminal or log viewer may take for a line end (\\r, \\v, \\f, \\x1c-\\x1e, \\x85, \\u2028...)."""
    return [line for line in output.splitlines() if line.lstrip().startswith(FORGED)]


async def raw_exchange(port: int, request: bytes, quiet: float = 3) -> tuple[bytes, bool]:
    """Write exact bytes; read until the server closes the connection (True) or sends nothing
    more for `quiet` seconds (False). A smuggled request would be answered well within that."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(request)
        await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), quiet)
            except asyncio.TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    finally:
        writer.close()


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP/1.1 response in `data`, in order: status, headers (lower-cased), body."""
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"a truncated response head: {head[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, data = body + data[:size], data[size + 2:]
                if size == 0:
                    break
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, data = data[:length], data[length:]
        else:  # delimited by the connection's close
            body, data = data, b""
        responses.append((int(lines[0].split()[1]), headers, body))
    return responses


def quote_all(text: str) -> str:
    """Every byte percent-encoded, so the path carries the name exactly."""
    return "".join(f"%{b:02X}" for b in text.encode())


def multipart(boundary: str, model: bytes, audio: bytes, close: bool = True) -> bytes:
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'.encode() + model +
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f'Content-Type: audio/wav\r\n\r\n'.encode() + audio)
    return body + f"\r\n--{boundary}--\r\n".encode() if close else body


# -- bodies no model can be read from ---------------------------------------------------------


UNREADABLE_JSON_BODIES = {
    "empty": b"",
    "only whitespace": b" \r\n\t ",
    "truncated before the value": b'{"model":',
    "truncated key": b'{"mod',
    "only an opening brace": b"{",
    "no colon": b'{"model" "m"}',
    "single quotes": b"{'model': 'm'}",
    "form syntax": b"model=m",
    "a JSON array": b'[{"model": "m"}]',
    "a JSON string": b'"m"',
    "a JSON number": b"42",
    "JSON null": b"null",
    "model only in a nested object": b'{"x": {"model": "m"}}',
    "UTF-16": '{"model": "m"}'.encode("utf-16"),
    "bytes that are not UTF-8": b"\xff\xfe\xfd\x80\x81{\xc3(",
    "NUL bytes": b"\x00" * 64,
    "a NUL inside the key": b'{"\x00model": "m"}',
    "model null": b'{"model": null}',
}


async def test_json_bodies_without_a_readable_model_get_the_no_model_404_envelope(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for label, body in UNREADABLE_JSON_BODIES.items():
            for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
                status, raw = await send(s, "POST", ls.url + path, body, {"Content-Type": "application/json"})
                assert_refused(status, raw, NO_MODEL, f"{label} to {path}")
        assert await running(s, ls) == []
        assert_no_traceback(await settled_output(s, ls))


JUNK_MODEL_BODIES = {
    "a raw NUL inside the model": b'{"model": "m\x00"}',
    "a raw newline inside the model": b'{"model": "m\n"}',
    "Latin-1 bytes inside the model": b'{"model": "m\xe9"}',
    "a lone surrogate escape": b'{"model": "\\ud800"}',
    "a model that is an object": b'{"model": {"id": "m"}}',
    "a model that is an array": b'{"model": ["m"]}',
    "a huge number": b'{"model": 1e999999}',
    "deep nesting": b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "truncated string": b'{"model": "m',
    "escape at the end": b'{"model": "m\\',
}


async def test_json_bodies_with_a_junk_model_value_are_refused_with_an_envelope(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for label, body in JUNK_MODEL_BODIES.items():
            status, raw = await send(s, "POST", ls.url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
            assert_refused(status, raw, what=label)
        assert await running(s, ls) == []
        assert_no_traceback(await settled_output(s, ls))


async def test_malformed_profile_requests_are_refused_with_an_envelope(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for body in (b"", b"{", b"[]", b'"x"', b"\xff\xfe", b'{"name": "\x00"}', b'{"name": 7}', b"\x00" * 16):
            status, raw = await send(s, "PUT", ls.url + "/api/profiles/active", body,
                                     {"Content-Type": "application/json"})
            assert_refused(status, raw, what=repr(body))
        assert_no_traceback(await settled_output(s, ls))


async def test_a_gzip_header_on_bytes_that_are_not_gzip_is_refused_without_a_traceback(in_process, upstreams):
    ls = await in_process(config(upstreams))
    not_gzip = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    # A connection each: a connection whose body could not be read is closed after the answer.
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(force_close=True)) as s:
        for path in ("/v1/chat/completions", "/upstream/m/v1/chat/completions"):
            status, raw = await send(s, "POST", ls.url + path, b'{"model": "m"}', not_gzip)
            assert_refused(status, raw, what=path)
        # Handlers that never read the body: the unread bytes are drained, and fail to inflate, after the answer.
        for method, path in (("OPTIONS", "/v1/chat/completions"), ("GET", "/health"), ("POST", "/api/models/unload")):
            status, raw = await send(s, method, ls.url + path, b'{"model": "m"}', not_gzip)
            assert status < 500, (method, path, status, raw[:300])
        assert_no_traceback(await settled_output(s, ls))


# -- gzip-encoded request bodies -----------------------------------------------------------------


async def test_a_gzip_encoded_request_body_reaches_the_upstream_readable(in_process, upstreams):
    ls = await in_process(config(upstreams))
    payload = {"model": "m", "messages": [{"role": "user", "content": "compressed hello " * 50}]}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for path in ("/v1/chat/completions", "/upstream/m/v1/chat/completions"):
            status, raw = await send(s, "POST", ls.url + path, gzip.compress(json.dumps(payload).encode()),
                                     {"Content-Type": "application/json", "Content-Encoding": "gzip"})
            assert status == 200, (path, raw[:1000])
            echo = json.loads(raw)["echo"]
            assert json.loads(echo["body"]) == payload, path
        assert_no_traceback(await settled_output(s, ls))


# -- broken multipart -----------------------------------------------------------------------------


AUDIO = b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 8
BROKEN_FORMS = {
    # label: (Content-Type, body); each names the real model m, so a lenient parser would start it
    "no boundary parameter": ("multipart/form-data", multipart("B0undary", b"m", AUDIO)),
    "an empty boundary": ("multipart/form-data; boundary=", multipart("B0undary", b"m", AUDIO)),
    "an unclosed quoted boundary": ('multipart/form-data; boundary="B0undary', multipart("B0undary", b"m", AUDIO)),
    "a boundary the body does not use": ("multipart/form-data; boundary=Other", multipart("B0undary", b"m", AUDIO)),
    "the model part cut off": ("multipart/form-data; boundary=B0undary",
                               b'--B0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\nm'),
    "the model part's head cut off": ("multipart/form-data; boundary=B0undary",
                                      b'--B0undary\r\nContent-Disposition: form-data; name="model"'),
    "the file part cut off": ("multipart/form-data; boundary=B0undary",
                              multipart("B0undary", b"m", AUDIO[:1000], close=False)),
}


async def test_broken_multipart_uploads_are_refused_and_start_nothing(in_process, upstreams):
    ls = await in_process(config(upstreams))
    url = ls.url + "/v1/audio/transcriptions"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for label, (content_type, body) in BROKEN_FORMS.items():
            status, raw = await send(s, "POST", url, body, {"Content-Type": content_type})
            assert_refused(status, raw, what=label)
        assert upstreams.alive() == [], "a broken form started the model"
        # The same form, whole, is served: the refusals above were about the breakage.
        status, raw = await send(s, "POST", url, multipart("B0undary", b"m", AUDIO),
                                 {"Content-Type": "multipart/form-data; boundary=B0undary"})
        assert status == 200, raw[:1000]
        assert json.loads(raw)["echo"]["model"] == "m"
        assert_no_traceback(await settled_output(s, ls))


# -- model names and log lines --------------------------------------------------------------------


ODD_MODEL_NAMES = ["x\n[INFO] forged", "m\r\n[INFO] forged", "\x1b[2K\r[INFO] forged", "m\x00", "\x00",
                   "../../etc/passwd", "a/b", "..\\x", "m/../m", "\u2028[INFO] forged", "m\x85[INFO] forged"]


async def test_model_names_with_control_characters_or_path_separators_are_refused(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for name in ODD_MODEL_NAMES:
            for path in ("/v1/chat/completions", "/v1/completions"):
                status, raw = await send(s, "POST", ls.url + path, json.dumps({"model": name}).encode(),
                                         {"Content-Type": "application/json"})
                assert_refused(status, raw, what=f"{name!r} to {path}")
            form = multipart("B0undary", name.encode(), AUDIO)
            status, raw = await send(s, "POST", ls.url + "/v1/audio/transcriptions", form,
                                     {"Content-Type": "multipart/form-data; boundary=B0undary"})
            assert_refused(status, raw, what=f"{name!r} in a form")
            status, raw = await send(s, "GET", URL(ls.url + "/v1/audio/voices").with_query(model=name))
            assert_refused(status, raw, what=f"{name!r} in a query")
            # Decoded, a slash there makes dot segments, and so a redirect: the traversal test covers those.
            if "/" not in name:
                status, raw = await send(s, "GET", URL(f"{ls.url}/upstream/{quote_all(name)}/health", encoded=True))
                assert_refused(status, raw, "model not found", f"{name!r} in an /upstream path")
        assert upstreams.alive() == []
        output = await settled_output(s, ls)
    assert_no_traceback(output)
    assert forged_lines(output) == [], forged_lines(output)
    assert "\x1b" not in output, "a client's escape sequence reached the operator's terminal"


# Request heads a client may send: nothing in them may start a line of our log. Each is sent on
# its own connection; a head that aiohttp refuses as malformed is just as good an outcome.
FORGING_HEADS = [
    b"GET /v1/models%0a%5BINFO%5D%20forged HTTP/1.1\r\nHost: x\r\n",
    b"GET /health%0d%0a%5BINFO%5D%20forged?q=%0d%0a%5BINFO%5D%20forged HTTP/1.1\r\nHost: x\r\n",
    b"GET /upstream/m%0a%5BINFO%5D%20forged/x HTTP/1.1\r\nHost: x\r\n",
    b"GET /ui/%0d%5BINFO%5D%20forged HTTP/1.1\r\nHost: x\r\n",
    b"GET /api/captures/%0a%5BINFO%5D%20forged HTTP/1.1\r\nHost: x\r\n",
    b"GET /logs/stream/%0a%5BINFO%5D%20forged HTTP/1.1\r\nHost: x\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4%0a[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: \xc2\x85[INFO] forged, 5.6.7.8\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: \xe2\x80\xa8[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\x0b[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Real-IP: \x1b[2K\x1b[0G[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: agent\r[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: agent\x0c[INFO] forged\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: agent%0d%0a[INFO] forged\r\n",
]


async def test_nothing_a_client_sends_starts_a_new_line_in_the_log(in_process, upstreams):
    ls = await in_process(config(upstreams))
    for head in FORGING_HEADS:
        data, _ = await raw_exchange(ls.port, head + b"Connection: close\r\n\r\n")
        responses = parse_responses(data) if data.startswith(b"HTTP/1.") else []
        assert responses and responses[0][0] < 500, (head, data[:500])
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, raw = await send(s, "POST", ls.url + "/v1/chat/completions", b'{"model": "x\\n[INFO] forged"}',
                                 {"Content-Type": "application/json"})
        assert_refused(status, raw, what="an escaped newline in the model")
        output = await settled_output(s, ls)
    assert_no_traceback(output)
    assert forged_lines(output) == [], forged_lines(output)
    assert "\x1b" not in output, "a client's escape sequence reached the operator's terminal"


# Header values in bytes that are not UTF-8 (obs-text: HTTP allows it, a Latin-1 client sends it).
NON_UTF8_HEADERS = [b"User-Agent: caf\xe9", b"X-Forwarded-For: 10.0.0.\xff", b"X-Real-IP: \xe9", b"Referer: /\xff"]


async def test_header_values_that_are_not_utf8_are_served_and_logged(in_process, upstreams):
    ls = await in_process(config(upstreams))
    body = b'{"model": "m"}'
    for header in NON_UTF8_HEADERS:
        for head in (b"GET /health HTTP/1.1\r\n",
                     b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n" % len(body)):
            data, _ = await raw_exchange(ls.port, head + b"Host: x\r\nConnection: close\r\n" + header + b"\r\n\r\n" +
                                         (body if head.startswith(b"POST") else b""))
            [(status, _, reply)] = parse_responses(data)
            assert status == 200, (header, head[:30], reply[:300])
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        # The captured headers show the bytes that are not UTF-8 as U+FFFD, as Go's JSON does.
        async def recorded() -> list[dict]:  # rows are written by a worker, a moment after the answer
            async with s.get(ls.url + "/api/metrics/activity") as r:
                return (await r.json())["data"]

        async def all_recorded() -> bool:
            return len(await recorded()) == len(NON_UTF8_HEADERS)
        assert await eventually(all_recorded, 10)
        rows = await recorded()
        async with s.get(f"{ls.url}/api/captures/{rows[-1]['id']}") as r:
            assert r.status == 200, await r.text()
            assert "\ufffd" in json.dumps((await r.json())["req_headers"], ensure_ascii=False)
        output = await settled_output(s, ls)
    assert_no_traceback(output)
    assert output.count('"GET /health HTTP/1.1" 200') >= len(NON_UTF8_HEADERS), "a request went unlogged"


async def test_a_client_that_leaves_the_event_stream_leaves_no_traceback(in_process, upstreams):
    ls = await in_process(config(upstreams))
    reader, writer = await asyncio.open_connection("127.0.0.1", ls.port)
    writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
    writer.close()  # as a browser does when its tab closes
    await writer.wait_closed()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await settled_output(s, ls)  # its access line is the next event the gone client would be sent
        output = await settled_output(s, ls)  # by now that send has failed, and said how
    assert_no_traceback(output)
    assert '"GET /api/events HTTP/1.1" 500' not in output


# -- bodies past maxRequestBodyMB ------------------------------------------------------------------


CHUNKED_HEAD, CHUNKED_TAIL, PIECE = b'{"model": "m", "prompt": "', b'"}', 64 * 1024


async def chunked(pieces: int):
    """A JSON body sent with Transfer-Encoding: chunked (no Content-Length), 64 KiB a piece."""
    yield CHUNKED_HEAD
    for _ in range(pieces):
        yield b"x" * PIECE
    yield CHUNKED_TAIL


async def test_chunked_uploads_past_max_request_body_get_a_413_envelope(in_process, upstreams):
    ls = await in_process(config(upstreams))  # maxRequestBodyMB: 1
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for path in ("/v1/chat/completions", "/upstream/m/v1/chat/completions"):
            async with s.post(ls.url + path, data=chunked(48),
                              headers={"Content-Type": "application/json"}) as r:
                assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
                assert_refused(r.status, await r.read(),
                               "request body too large: the limit is 1 MB (maxRequestBodyMB)", path)
                assert r.status == 413, path
        assert upstreams.alive() == []  # refused before any model started
        async with s.post(ls.url + "/v1/chat/completions", data=chunked(8),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()  # a chunked body under the limit goes through
            assert (await r.json())["echo"]["body_len"] == len(CHUNKED_HEAD) + 8 * PIECE + len(CHUNKED_TAIL)
        assert_no_traceback(await settled_output(s, ls))


async def test_a_body_past_max_request_body_gets_a_413_envelope_and_nothing_starts(in_process, upstreams):
    ls = await in_process({"maxRequestBodyMB": 1, "healthCheckTimeout": 15,
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


# -- path traversal and redirects -----------------------------------------------------------------


TRAVERSALS = [
    "/ui/../llama_swap.py", "/ui/%2e%2e/%2e%2e/etc/passwd", "/ui/..%2f..%2fetc/passwd", "/ui/..%2fllama_swap.py",
    "/ui/%2e%2e%2fllama_swap.py", "/ui/.%2e/llama_swap.py", "/ui/..%5cllama_swap.py", "/ui/..\\llama_swap.py",
    "/ui/%252e%252e/llama_swap.py", "/ui/....//llama_swap.py", "/ui//etc/passwd", "/ui/%2f%2fetc/passwd",
    "/favicon.ico/../llama_swap.py", "/ui/" + "../" * 12 + "etc/passwd",
    "/upstream/../api/models/unload", "/upstream/m/..%2f..%2fetc", "/upstream/m/..%2f..%2fetc/passwd",
    "/upstream/m/%2e%2e/%2e%2e/etc/passwd", "/upstream/m/../../llama_swap.py", "/upstream/%2e%2e/%2e%2e/etc/passwd",
    # open redirects: a cleaned path must never turn into another host
    "//evil.example/%2e%2e/", "/%2fevil.example/.", "/\\evil.example/..", "///evil.example/ui/.",
]


def assert_same_server_clean_location(location: str, origin: str) -> None:
    """A redirect that stays here and has no dot segments left for the next hop to resolve."""
    target = urlsplit(location)
    assert not target.scheme and not target.netloc, f"{origin} redirects off the server: {location}"
    assert location.startswith("/") and not location.startswith(("//", "/\\")), f"{origin}: {location}"
    segments = urlsplit(location).path.replace("%2e", ".").replace("%2E", ".").split("/")
    assert ".." not in segments and "." not in segments, f"{origin}: {location}"


async def test_path_traversal_never_serves_a_file_outside_the_ui_and_redirects_stay_here(in_process, upstreams):
    ls = await in_process(config(upstreams))
    assert PROXY_SOURCE_MARK in (ROOT / "llama_swap.py").read_bytes()
    assert PASSWD_MARK in Path("/etc/passwd").read_bytes()
    for path in TRAVERSALS:
        target = path
        for _hop in range(5):
            data, _ = await raw_exchange(ls.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                         .encode("latin-1"))
            [(status, headers, body)] = parse_responses(data)
            assert PROXY_SOURCE_MARK not in body and PASSWD_MARK not in body, f"{path} -> {target} served a file"
            assert status < 500, (path, target, status, body[:300])
            if status not in (301, 302, 307, 308):
                break
            assert_same_server_clean_location(headers["location"], f"{path} -> {target}")
            target = headers["location"]
    assert upstreams.alive() == [], "a traversal reached a model's server"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert_no_traceback(await settled_output(s, ls))


# -- oversized request heads ------------------------------------------------------------------------


# Past the limits on purpose: llama-swap allows 16 KiB request lines, 32 KiB header fields (a
# browser sends every localhost cookie) and 128 headers.
OVERSIZED_HEADS = {
    "a 20 KB request line": b"GET /health?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "a 64 KB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 65_536 + b"\r\n\r\n",
    "200 headers": b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "a 64 KB header name": b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"N" * 65_536 + b": v\r\n\r\n",
}


async def test_oversized_request_heads_get_a_4xx_and_at_most_one_short_log_line(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for label, head in OVERSIZED_HEADS.items():
            before = len((await settled_output(s, ls)).splitlines())
            data, closed = await raw_exchange(ls.port, head)
            responses = parse_responses(data)
            assert len(responses) == 1 and 400 <= responses[0][0] < 500, (label, data[:300])
            assert closed, f"{label}: the connection stayed open after a framing error"
            said = (await settled_output(s, ls)).splitlines()[before:-1]  # the last line is the checkpoint's
            assert len(said) <= 1, (label, said)
            assert all(len(line) < 2000 for line in said), f"{label}: the oversized bytes were copied into the log"
        assert_no_traceback(ls.output())


# -- request smuggling --------------------------------------------------------------------------------


# A hidden request that would be visible if it ran: it unloads the model the test loaded first.
HIDDEN = b"POST /api/models/unload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
SMUGGLING = {
    "Content-Length beside Transfer-Encoding":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
    "Transfer-Encoding beside Content-Length":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n" % (5 + len(HIDDEN)) + HIDDEN,
    "two different Content-Lengths":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: %d\r\n\r\n{}" % (2 + len(HIDDEN)) + HIDDEN,
    "Content-Lengths in one header":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2, %d\r\n\r\n{}" % (2 + len(HIDDEN)) + HIDDEN,
    "Transfer-Encoding: chunked, identity":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + HIDDEN,
    "Transfer-Encoding with a space before the colon":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding : chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n" % (5 + len(HIDDEN)) + HIDDEN,
    "Content-Length with a space before the colon":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length : 2\r\n\r\n{}" + HIDDEN,
    "Transfer-Encoding folded onto the next line (obs-fold)":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding:\r\n chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n" % (5 + len(HIDDEN)) + HIDDEN,
    "a chunk size with junk after it":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2 x\r\n{}\r\n0\r\n\r\n" + HIDDEN,
    "a bare LF inside a chunk size line":
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n" + HIDDEN,
}


async def test_smuggling_attempts_get_a_400_close_the_connection_and_never_run_the_hidden_request(
        in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await chat(s, ls, "m"))[0] == 200
        for label, request in SMUGGLING.items():
            data, closed = await raw_exchange(ls.port, request)
            responses = parse_responses(data)
            assert [status for status, _, _ in responses] == [400], (label, data[:600])
            assert closed, f"{label}: the connection stayed open after a framing error"
            assert [e["model"] for e in await running(s, ls)] == ["m"], f"{label}: the hidden unload ran"
        output = await settled_output(s, ls)
    assert_no_traceback(output)
    assert '"POST /api/models/unload' not in output


# Pipelined after a request, so that the exchange ends once it is answered (it asks for the close).
LAST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def only_answer(port: int, request: bytes) -> tuple[int, bytes]:
    """Status and body of the answer to `request`, with LAST sent after it: an answer to
    anything hidden in between fails."""
    data, _ = await raw_exchange(port, request + LAST)
    responses = parse_responses(data)
    assert [(status, body) for status, _, body in responses[1:]] == [(200, b"OK")], data[:1000]
    return responses[0][0], responses[0][2]


async def test_a_request_hidden_in_a_body_is_only_ever_body(in_process, upstreams):
    ls = await in_process(config(upstreams))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await chat(s, ls, "m"))[0] == 200
        body = json.dumps({"model": "m", "prompt": HIDDEN.decode()}).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        status, reply = await only_answer(ls.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status == 200 and json.loads(reply)["echo"]["body"] == body.decode()  # the upstream got it as text
        # No model at all: refused, and still only a body.
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        status, reply = await only_answer(ls.port, head + b"Content-Length: %d\r\n\r\n" % len(HIDDEN) + HIDDEN)
        assert_refused(status, reply, NO_MODEL, "a request as a text/plain body")
        assert [e["model"] for e in await running(s, ls)] == ["m"]
        output = await settled_output(s, ls)
    assert_no_traceback(output)
    assert '"POST /api/models/unload' not in output
