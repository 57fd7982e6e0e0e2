"""Our own HTTP/1.1 client for plain-http upstreams (Connections, UpstreamConnection): what it
puts on the wire, every framing of an answer, kept-alive connections and when one is not
reused, requests sent again on a connection closed under them, malformed and cut answers,
back-pressure from a slow reader, idle connections closed.

The upstreams here are scripted TCP servers on 127.0.0.1 that answer with exact bytes, often a
few at a time, to reach the edges a friendly server never shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import textwrap

import aiohttp
import pytest

from helpers import eventually, free_port
from llama_swap import ANSWER_HIGH_WATER, Connections, Timeouts, UpstreamError


class Scripted:
    """A TCP server on 127.0.0.1: each request it reads (head and Content-Length body) is
    recorded, and answered by the next step of `steps`: bytes to write, or an async function
    (reader, writer) that does something else (dribbles, closes, waits). When the steps run
    out, the connection is closed. `finished` counts connections ended, `closed_by_client` those
    the client closed between requests."""

    def __init__(self, *steps) -> None:
        self.steps = list(steps)
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self.finished = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                self.requests.append(head + (await reader.readexactly(int(length[1])) if length else b""))
                if not self.steps:
                    return
                step = self.steps.pop(0)
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif await step(reader, writer) == "close":
                    return
        finally:
            self.finished += 1
            writer.close()


def ok(body: bytes = b"ok", *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def dribble(answer: bytes, then: str = ""):
    """A step that writes `answer` one byte at a time, each in a segment of its own."""
    async def step(reader, writer):
        for at in range(len(answer)):
            writer.write(answer[at:at + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        return then
    return step


def then_close(data: bytes):
    """A step that writes `data` and closes the connection."""
    async def step(reader, writer):
        writer.write(data)
        return "close"
    return step


async def fetch(connections: Connections, method: str = "GET", path: str = "/x",
                headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> tuple[int, dict, bytes]:
    answer = await connections.send(method, path, headers or [], body)
    async with answer:
        data = b"".join([chunk async for chunk in answer.content.iter_any()])
    return answer.status, dict(answer.headers), data


@pytest.fixture
async def pool():
    made = []

    def make(url: str, **timeouts) -> Connections:
        made.append(Connections(url, Timeouts(**timeouts)))
        return made[-1]
    yield make
    for connections in made:
        connections.close()


# -- the request on the wire ---------------------------------------------------------------------


async def test_a_request_leaves_as_one_head_host_first_with_a_length_where_aiohttp_puts_one(pool):
    async with Scripted(ok(), ok(), ok(), ok()) as up:
        connections = pool(up.url + "/base/")
        await fetch(connections, "POST", "/v1/x?a=%20b", [("X-One", "1"), ("X-One", "2")], b'{"a":1}')
        await fetch(connections, "GET", "/v1/y", [("Host", "client.example"), ("Accept", "*/*")])
        await fetch(connections, "DELETE", "/z")
        # Header bytes that are not UTF-8 came in as surrogate escapes; they leave as they came.
        await fetch(connections, "GET", "/w", [("X-Raw", b"caf\xe9".decode("utf-8", "surrogateescape"))])
    host = f"127.0.0.1:{up.port}"
    assert up.requests == [
        f'POST /base/v1/x?a=%20b HTTP/1.1\r\nHost: {host}\r\nX-One: 1\r\nX-One: 2\r\nContent-Length: 7\r\n\r\n'
        '{"a":1}'.encode(),
        b"GET /base/v1/y HTTP/1.1\r\nHost: client.example\r\nAccept: */*\r\n\r\n",
        f"DELETE /base/z HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode(),
        f"GET /base/w HTTP/1.1\r\nHost: {host}\r\nX-Raw: caf".encode() + b"\xe9\r\n\r\n",
    ]
    assert up.connections == 1


async def test_a_body_of_many_mib_goes_out_whole_a_mib_at_a_time(pool):
    body = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB and a bit: six slices
    async with Scripted(ok()) as up:
        assert (await fetch(pool(up.url), "POST", body=body))[2] == b"ok"
    assert up.requests[0].endswith(b"Content-Length: %d\r\n\r\n" % len(body) + body)


@contextlib.asynccontextmanager
async def reads_heads_only(step):
    """A server that reads a request's head, never its body, then runs `step` (reader, writer);
    its URL. `step` may wait on the event it is given as its third argument, set on the way out."""
    done = asyncio.Event()

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        try:
            await step(reader, writer, done)
        finally:
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        done.set()
        server.close()


async def test_an_answer_that_comes_before_the_upstream_took_the_body_ends_the_sending(pool):
    """A 413 after the head, the body never read: the client gets the upstream's answer, not a hang."""
    async def refuse(reader, writer, done):
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await done.wait()
    async with reads_heads_only(refuse) as url:
        status, _headers, body = await asyncio.wait_for(fetch(pool(url), "POST", body=b"x" * (64 << 20)), 20)
    assert (status, body) == (413, b"big")


async def test_a_request_given_up_in_the_middle_of_its_body_closes_its_connection_at_once(pool):
    async def take_nothing(reader, writer, done):
        await done.wait()
    async with reads_heads_only(take_nothing) as url:
        connections = pool(url)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(connections.send("POST", "/", [], b"x" * (64 << 20)), 0.5)
        # Closed, not left flushing MiBs into a socket nobody reads (it would stay open until done.set()).
        assert await eventually(lambda: not connections.open and not connections.idle, timeout=2)


async def test_a_malformed_answer_while_a_big_body_goes_out_fails_the_request_at_once(pool):
    async def bad_head(reader, writer, done):
        writer.write(b"HTTP/1.1 200 OK\r\nBad\x01: x\r\n\r\n")
        await done.wait()
    async with reads_heads_only(bad_head) as url:
        with pytest.raises(UpstreamError, match="malformed answer: a control character"):
            await asyncio.wait_for(fetch(pool(url), "POST", body=b"x" * (64 << 20)), 20)


async def test_closing_the_connections_fails_a_waiting_request_and_breaks_a_body_off(pool):
    """As when a model's server stops with requests on it: a 502 and a cut answer, never a
    cancellation (which would look like a client that left) or a cut answer taken for whole."""
    async def answer_part_until_close(reader, writer) -> str:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one")
        await reader.read()
        return "close"
    async with Scripted(wait_for_the_client, answer_part_until_close) as up:
        connections = pool(up.url)
        waiting = asyncio.ensure_future(connections.send("GET", "/", [], b""))
        assert await eventually(lambda: len(up.requests) == 1, timeout=5)
        connections.close()
        with pytest.raises(UpstreamError, match="the server stopped, or llama-swap is shutting down"):
            await waiting
        with pytest.raises(UpstreamError, match="the server stopped"):  # and nothing new goes out
            await connections.send("GET", "/", [], b"")

        connections = pool(up.url)
        answer = await connections.send("GET", "/", [], b"")
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError, match="the server stopped"):
            async with answer:
                async for chunk in answer.content.iter_any():
                    got += chunk
                    connections.close()
        assert got == b"part one"


async def test_a_host_name_is_looked_up_and_each_address_tried(pool):
    async with Scripted(ok(b"by name")) as up:
        connections = pool(f"http://localhost:{up.port}")
        assert (await fetch(connections))[2] == b"by name"
    assert up.requests[0].startswith(f"GET /x HTTP/1.1\r\nHost: localhost:{up.port}\r\n".encode())


@pytest.mark.parametrize("name, value", [("X-Evil", "a\r\nX-Injected: 1"), ("X-Evil", "a\nb"), ("X\rY", "1")])
async def test_a_header_that_would_break_a_line_is_refused_and_nothing_is_sent(pool, name, value):
    async with Scripted(ok()) as up:
        with pytest.raises(UpstreamError, match="line break"):
            await fetch(pool(up.url), headers=[(name, value)])
        await asyncio.sleep(0.05)
    assert up.requests == []


# -- answers, every way they are framed ----------------------------------------------------------

CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"d\r\ndata: first\n\n\r\n"
           b"E;name=value\r\ndata: second\n\n\r\n"
           b"0\r\nX-Trailer: dropped\r\n\r\n")


@pytest.mark.parametrize("answer, method, status, body", [
    (ok(b"hello world"), "GET", 200, b"hello world"),
    (CHUNKED, "POST", 200, b"data: first\n\ndata: second\n\n"),
    (CHUNKED.replace(b"\r\n", b"\n"), "POST", 200, b"data: first\n\ndata: second\n\n"),  # bare LFs, as some send
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"after"), "POST", 200,
     b"after"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", "DELETE", 204, b""),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", "GET", 304, b""),
    (ok(b"a body a HEAD never gets"), "HEAD", 200, b""),
    (b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n  two\r\nContent-Length: 1\r\n\r\n!", "GET", 200, b"!"),
], ids=["length", "chunked", "bare-lf", "interim", "204", "304", "head", "folded"])
async def test_each_framing_arrives_whole_even_a_byte_per_segment_and_the_connection_is_kept(
        pool, answer, method, status, body):
    answer = answer[:-len(b"a body a HEAD never gets")] if method == "HEAD" else answer
    async with Scripted(dribble(answer), ok(b"next")) as up:
        connections = pool(up.url)
        got_status, headers, got = await fetch(connections, method)
        assert (got_status, got) == (status, body)
        assert "X-Trailer" not in headers
        if "X-Folded" in headers:
            assert headers["X-Folded"] == "one two"
        assert (await fetch(connections))[2] == b"next"
    assert up.connections == 1, "the answer was read to its end, so its connection carries the next request"


@pytest.mark.parametrize("answer", [
    ok(b"bye", "Connection: close"),
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",  # 1.0 without keep-alive
    ok(b"bye") + b"extra bytes nobody asked for",
], ids=["close", "http/1.0", "out-of-step"])
async def test_a_connection_that_cannot_carry_another_request_is_not_reused(pool, answer):
    async with Scripted(answer, ok(), ok()) as up:
        connections = pool(up.url)
        assert (await fetch(connections))[2] == b"bye"
        assert (await fetch(connections))[2] == b"ok"
    assert up.connections == 2


async def test_a_length_beside_chunked_is_dropped_and_the_connection_not_trusted_again(pool):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    async with Scripted(answer, ok(), ok()) as up:
        connections = pool(up.url)
        status, headers, body = await fetch(connections)
        assert (status, body) == (200, b"abc") and "Content-Length" not in headers
        assert (await fetch(connections))[2] == b"ok"
    assert up.connections == 2


async def test_an_answer_without_a_length_runs_until_the_upstream_closes(pool):
    async def until_close(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        return "close"
    async with Scripted(until_close, ok()) as up:
        connections = pool(up.url)
        assert (await fetch(connections))[2] == b"part one, part two"
        assert (await fetch(connections))[2] == b"ok"
    assert up.connections == 2


# -- connections closed under a request ----------------------------------------------------------


async def test_a_request_on_a_kept_connection_the_upstream_closed_is_sent_again_on_a_fresh_one(pool):
    async def answer_then_drop_the_next(reader, writer):
        writer.write(ok(b"first"))
        await writer.drain()
        up.requests.append(await reader.readuntil(b"\r\n\r\n"))  # and closes without a word: llama-server
        return "close"
    async with Scripted(answer_then_drop_the_next, ok(b"second")) as up:
        connections = pool(up.url)
        assert (await fetch(connections))[2] == b"first"
        assert (await fetch(connections, "POST", body=b"{}"))[2] == b"second"
    assert up.connections == 2
    assert [r.split(b" ")[0] for r in up.requests] == [b"GET", b"POST", b"POST"]  # dropped once, sent again


async def test_a_request_the_upstream_began_to_answer_is_never_sent_again(pool):
    async with Scripted(ok(b"first"), then_close(b"HTTP/1.1 200 OK\r\nContent-Le")) as up:  # dropped mid-head
        connections = pool(up.url)
        assert (await fetch(connections))[2] == b"first"
        with pytest.raises(UpstreamError, match="closed the connection before it answered"):
            await fetch(connections, "POST", body=b"{}")  # on the kept-alive connection: reused, yet not resent
    assert [r.split(b" ")[0] for r in up.requests] == [b"GET", b"POST"]
    async with Scripted(then_close(b"")) as up:  # a fresh connection dropped without a word: not resent either
        with pytest.raises(UpstreamError, match="closed the connection before it answered"):
            await fetch(pool(up.url), "POST", body=b"{}")
    assert len(up.requests) == 1


async def test_a_refused_connection_says_so_as_go_does(pool):
    port = free_port()
    with pytest.raises(UpstreamError, match=f"^dial tcp 127.0.0.1:{port}: connect: connection refused$"):
        await fetch(pool(f"http://127.0.0.1:{port}"))


# -- answers that are wrong or cut ---------------------------------------------------------------


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line 'HTTP/2 200 OK'"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line 'no colon here'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (1 << 20) + b"\r\n\r\n", "head over 1048576 bytes"),
    (b"HTTP/1.1 200 OK\r\nX-A: b\rc\r\nContent-Length: 0\r\n\r\n", "a control character b'\\r' in the head"),
    (b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 0\r\n\r\n", "a control character b'\\x00'"),
    (b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 0\r\n\r\n", "malformed header line 'X A: b'"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header line ' folded: x'"),  # nothing to fold into
], ids=["http2", "not-http", "no-colon", "two-lengths", "negative", "204-bad-length", "huge-head", "bare-cr", "nul",
        "space-in-name", "folded-first"])
async def test_a_malformed_answer_head_is_an_error_that_says_what_was_wrong(pool, answer, message):
    async with Scripted(answer) as up:
        with pytest.raises(UpstreamError, match="^malformed answer: ") as caught:
            await fetch(pool(up.url))
    assert message in str(caught.value)


async def read_until_error(connections: Connections) -> tuple[bytes, str]:
    """The body bytes that came before the body broke off, and the error it broke off with."""
    answer, got = await connections.send("GET", "/", [], b""), b""
    with pytest.raises(aiohttp.ClientPayloadError) as caught:
        async with answer:
            async for chunk in answer.content.iter_any():
                got += chunk
    return got, str(caught.value)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("answer, got", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", b"only ten b"),
    (CHUNKED_HEAD + b"5\r\nhello\r\n", b"hello"),  # no last chunk
], ids=["short", "no-last-chunk"])
async def test_a_body_the_upstream_cuts_raises_after_what_came_and_is_never_a_short_whole_answer(pool, answer, got):
    async with Scripted(then_close(answer)) as up:
        assert await read_until_error(pool(up.url)) == (
            got, "the upstream closed the connection in the middle of the answer")


async def wait_for_the_client(reader, writer) -> str:
    await reader.read()
    return "close"


@pytest.mark.parametrize("answer, got, message", [
    (CHUNKED_HEAD + b"5\r\nhello world\r\n", b"hello", "a chunk longer than its size"),
    (CHUNKED_HEAD + b"zz\r\nhello\r\n", b"", "malformed chunk size 'zz'"),
    (CHUNKED_HEAD + b"5\r\nhello\r\r\r\n", b"hello", "a chunk longer than its size"),
    (CHUNKED_HEAD + b"5;" + b"x" * 5000 + b"\r\nhello\r\n", b"", "a chunk size or trailer line over 4096 bytes"),
], ids=["overlong-chunk", "bad-size", "stray-crs", "long-extension"])
async def test_a_body_that_goes_wrong_raises_at_once_saying_how_though_the_upstream_stays(pool, answer, got, message):
    async with Scripted(answer, wait_for_the_client) as up:
        assert await read_until_error(pool(up.url)) == (got, f"malformed answer: {message}")


async def test_a_slow_reader_pauses_the_upstream_instead_of_queueing_its_answer(pool):
    size = 32 * 1024 * 1024
    async with Scripted(ok(b"x" * size)) as up:
        answer = await pool(up.url).send("GET", "/", [], b"")
        async with answer:
            await asyncio.sleep(0.5)  # the upstream writes as fast as it can meanwhile
            connection = answer.content
            assert connection._paused
            assert connection._queued <= ANSWER_HIGH_WATER + 256 * 1024, connection._queued  # one read past it
            total = 0
            async for chunk in answer.content.iter_any():
                total += len(chunk)
    assert total == size


async def part_then_wait(reader, writer) -> str:
    """Three bytes of ten, then nothing until the client goes."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    await reader.read()
    return "close"


async def test_idle_connections_close_after_idle_conn_and_close_ends_every_one(pool):
    async with Scripted(ok(), ok(), part_then_wait) as up:
        connections = pool(up.url, idle_conn=2)
        await fetch(connections)
        await asyncio.sleep(0.3)
        assert up.closed_by_client == 0 and len(connections.idle) == 1  # kept while under idle_conn
        assert await eventually(lambda: up.closed_by_client == 1, timeout=8)
        assert not connections.idle and not connections.open
        await fetch(connections)
        answer = await connections.send("GET", "/", [], b"")  # one in use, its body unread
        connections.close()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with answer:
                async for _chunk in answer.content.iter_any():
                    await asyncio.sleep(0.1)
        assert await eventually(lambda: up.finished == 2, timeout=5)
    assert up.connections == 2


async def test_idle_conn_zero_keeps_a_connection_however_long_it_waits(pool):
    async with Scripted(ok(), ok()) as up:
        connections = pool(up.url, idle_conn=0)
        await fetch(connections)
        await asyncio.sleep(1.2)
        await fetch(connections)
    assert up.connections == 1 and up.closed_by_client == 0


# -- through the proxy ---------------------------------------------------------------------------

COUNTS_CONNECTIONS = textwrap.dedent(r'''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.answer(b"ok")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer(json.dumps({"peer_port": self.client_address[1]}).encode())

        def answer(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


async def test_the_proxy_relays_requests_in_a_row_over_one_kept_connection(in_process, tmp_path):
    script = tmp_path / "counts_connections.py"
    script.write_text(COUNTS_CONNECTIONS)
    ls = await in_process({"models": {"m": {"cmd": f"{sys.executable} {script} ${{PORT}}"}}})
    ports = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
                assert r.status == 200
                ports.add(json.loads(await r.read())["peer_port"])
    assert len(ports) == 1, f"5 requests in a row took {len(ports)} connections"
    connections = ls.runtime.scheduler.processes["m"].upstream.connections
    assert connections is not None and len(connections.idle) == 1
