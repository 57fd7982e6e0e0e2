"""Gateway features (`filters` that edit request bodies, `peers` that serve models from other
servers), checked on what the upstream really received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from helpers import PY, RESPONDER, LlamaSwap, chat, free_port, free_port_block, wait_until
from llama_swap import apply_filters, json_delete, json_set, parse_config


async def post_raw(session: aiohttp.ClientSession, url: str, body: bytes,
                   headers: dict | None = None) -> tuple[int, dict]:
    async with session.post(url + "/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, json.loads(await r.read())


@pytest.mark.parametrize("path, expected", [
    ("temperature", '{"model": "m",\n  "top_p" :0.9, "nested": {"a": 1, "b": [1, 2]}}'),
    ("top_p", '{"model": "m",\n  "temperature": 0.7, "nested": {"a": 1, "b": [1, 2]}}'),
    ("nested.a", '{"model": "m",\n  "temperature": 0.7, "top_p" :0.9, "nested": {"b": [1, 2]}}'),
    ("nested.b", '{"model": "m",\n  "temperature": 0.7, "top_p" :0.9, "nested": {"a": 1}}'),
    ("absent", '{"model": "m",\n  "temperature": 0.7, "top_p" :0.9, "nested": {"a": 1, "b": [1, 2]}}'),
])
def test_deleting_a_path_keeps_every_other_byte(path, expected):
    body = '{"model": "m",\n  "temperature": 0.7, "top_p" :0.9, "nested": {"a": 1, "b": [1, 2]}}'
    assert json_delete(body, path) == expected


@pytest.mark.parametrize("path, value, expected", [
    ("temperature", 0.1, '{"model": "m", "temperature": 0.1 }'),
    ("max_tokens", 64, '{"model": "m", "temperature": 0.7 ,"max_tokens":64}'),
    ("chat_template_kwargs.enable_thinking", False,
     '{"model": "m", "temperature": 0.7 ,"chat_template_kwargs":{"enable_thinking":false}}'),
    ("temperature", {"x": "é"}, '{"model": "m", "temperature": {"x":"é"} }'),
])
def test_setting_a_path_changes_only_that_value(path, value, expected):
    assert json_set('{"model": "m", "temperature": 0.7 }', path, value) == expected


ARRAYS = '{"a": [1, {"b": 2}, [3, 4]], "x.y": 1}'


@pytest.mark.parametrize("path, value, expected", [
    ("a.0", 9, '{"a": [9, {"b": 2}, [3, 4]], "x.y": 1}'),
    ("a.1.b", 9, '{"a": [1, {"b": 9}, [3, 4]], "x.y": 1}'),
    ("a.2.1", 9, '{"a": [1, {"b": 2}, [3, 9]], "x.y": 1}'),
    ("a.-1", 9, '{"a": [1, {"b": 2}, [3, 4],9], "x.y": 1}'),  # -1 appends
    ("a.5", 9, '{"a": [1, {"b": 2}, [3, 4],null,null,9], "x.y": 1}'),  # past the end: padded with nulls
    ("a.name", 9, ARRAYS),  # a name where an array is: nothing to set
    ("x\\.y", 2, '{"a": [1, {"b": 2}, [3, 4]], "x.y": 2}'),  # an escaped dot is part of the key
    ("a.1.c.d", True, '{"a": [1, {"b": 2,"c":{"d":true}}, [3, 4]], "x.y": 1}'),
])
def test_setting_sjson_paths_with_array_indexes_and_escapes(path, value, expected):
    assert json_set(ARRAYS, path, value) == expected


@pytest.mark.parametrize("path, expected", [
    ("a.0", '{"a": [{"b": 2}, [3, 4]], "x.y": 1}'),
    ("a.1", '{"a": [1, [3, 4]], "x.y": 1}'),
    ("a.-1", '{"a": [1, {"b": 2}], "x.y": 1}'),  # -1 is the last element
    ("a.1.b", '{"a": [1, {}, [3, 4]], "x.y": 1}'),
    ("x\\.y", '{"a": [1, {"b": 2}, [3, 4]]}'),
    ("a.9", ARRAYS),
    ("x.y", ARRAYS),  # unescaped: key x, then y, which do not exist
])
def test_deleting_sjson_paths_with_array_indexes_and_escapes(path, expected):
    assert json_delete(ARRAYS, path) == expected


def test_nested_paths_edit_every_copy_of_a_duplicated_parent():
    # A JSON reader may keep either copy (Python's and Go's keep the last): a limit must hold in both.
    twice = '{"kw":{"think":true},"kw":{"think":true}}'
    assert json_set(twice, "kw.think", False) == '{"kw":{"think":false},"kw":{"think":false}}'
    assert json_delete('{"a":{"b":1},"a":{"b":2}}', "a.b") == '{"a":{},"a":{}}'
    assert json_set('{"a":{"x":1},"a":{"y":1}}', "a.b.c", 3) == '{"a":{"x":1,"b":{"c":3}},"a":{"y":1,"b":{"c":3}}}'


def test_array_edits_at_the_edges():
    assert json_set('{"a":[]}', "a.0", 1) == '{"a":[1]}'
    assert json_set('{"a":[ ]}', "a.-1", 1) == '{"a":[ 1]}'
    assert json_delete('{"a":[ 1 ]}', "a.0") == '{"a":[  ]}'
    assert json_delete('{"a":[[1,2], "]"]}', "a.1") == '{"a":[[1,2]]}'


def test_filters_strip_then_set_then_set_by_id_and_never_touch_model():
    config = parse_config("""
models:
  m:
    cmd: srv --port ${PORT}
    filters:
      stripParams: "top_p, model, temperature"
      setParams: {temperature: 0.2, model: evil, max_tokens: 100}
      setParamsByID:
        "${MODEL_ID}:think": {max_tokens: 4000, reasoning: {effort: high}}
""")
    body = b'{"model":"m:think","top_p":0.5,"temperature":1.5,"messages":[{"role":"user","content":"hi"}]}'
    out = json.loads(apply_filters(body, config.models["m"].filters, "m:think"))
    assert out == {"model": "m:think", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
                   "max_tokens": 4000, "reasoning": {"effort": "high"}}
    assert config.real_model_id("m:think") == "m"


async def test_filters_reach_the_upstream_byte_for_byte(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd(name="m"),
        "filters": {"stripParams": "top_p", "setParams": {"temperature": 0.2}}}}})
    body = (b'{ "model" : "m" ,\n "top_p": 0.5,\t"messages": [ {"role":"user","content":"\\u00e9 <b>"} ], '
            b'"temperature": 1 }')
    async with aiohttp.ClientSession() as s:
        status, reply = await post_raw(s, ls.url, body)
    assert status == 200, reply
    expected = b'{ "model" : "m" ,\n "messages": [ {"role":"user","content":"\\u00e9 <b>"} ], "temperature": 0.2 }'
    assert reply["echo"]["body"].encode() == expected


async def test_a_bare_peer_model_and_its_full_name_reach_the_peer_with_its_key(in_process, upstreams, tmp_path):
    # The "peer" is a second llama-swap-py with one model; ours forwards to it.
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    peer = LlamaSwap(peer_dir, {"startPort": free_port_block(), "healthCheckTimeout": 15,
                                "models": {"remote-model": {"cmd": upstreams.cmd(name="remote-model")}}})
    try:
        ls = await in_process({"healthCheckTimeout": 15, "models": {"local": {"cmd": upstreams.cmd(name="local")}},
                               "peers": {"box2": {"proxy": peer.url, "models": ["remote-model"],
                                                  "apiKey": "peer-secret",
                                                  "filters": {"setParams": {"temperature": 0.3}}}}})
        async with aiohttp.ClientSession() as s:
            for name in ("box2/remote-model", "remote-model"):
                status, reply = await post_raw(s, ls.url, json.dumps({"model": name, "temperature": 1}).encode(),
                                               {"Authorization": "Bearer client-key"})
                assert status == 200, reply
                echo = reply["echo"]
                assert json.loads(echo["body"]) == {"model": "remote-model", "temperature": 0.3}
                assert echo["headers"]["Authorization"] == "Bearer peer-secret"
                assert (echo["headers"]["x-api-key"] == "peer-secret"
                        or echo["headers"].get("X-Api-Key") == "peer-secret")
            async with s.get(ls.url + "/v1/models") as r:
                records = {m["id"]: m for m in (await r.json())["data"]}
            assert records["box2/remote-model"]["meta"] == {"llamaswap": {"type": "peer", "peerID": "box2"}}
            assert records["box2/remote-model"]["name"] == "box2: remote-model"
            async with s.get(ls.url + "/running") as r:
                assert (await r.json())["running"] == []  # a peer is never "loaded" here
    finally:
        peer.stop()


async def test_a_peer_that_cannot_be_reached_gets_a_502_envelope(in_process, upstreams):
    dead = f"http://127.0.0.1:{free_port()}/api"
    ls = await in_process({"healthCheckTimeout": 15, "models": {"local": {"cmd": upstreams.cmd(name="local")}},
                           "peers": {"gone": {"proxy": dead, "models": ["x"]}}})
    async with aiohttp.ClientSession() as s:
        status, reply = await post_raw(s, ls.url, b'{"model":"gone/x"}')
    assert status == 502
    assert reply["error"]["code"] == "bad_gateway"
    assert reply["error"]["message"].startswith("peer proxy error: ")
    assert "peer gone: proxy error:" in ls.output()


async def test_loading_state_streams_progress_as_reasoning_then_the_answer(in_process, upstreams):
    import openai

    ls = await in_process({"healthCheckTimeout": 15, "sendLoadingState": True,
                           "models": {"slow": {"cmd": upstreams.cmd("--startup-delay", "1.5", name="slow")}}})
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="unused", max_retries=0)
    reasoning, content = [], []
    stream = await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = getattr(delta, "model_extra", None) or {}
        if extra.get("reasoning_content"):
            assert not content, "progress must come before the answer"
            reasoning.append(extra["reasoning_content"])
        if delta.content:
            content.append(delta.content)
    text = "".join(reasoning)
    assert "llama-swap loading model: slow" in text
    assert "." in text and "Done! (" in text
    assert "".join(content) == "tok0 tok1 tok2 tok3 tok4 "
    await client.close()


async def test_loading_text_is_typed_out_with_remarks_and_the_end_comes_at_once(in_process, upstreams):
    from llama_swap import LoadingStream

    ls = await in_process({"healthCheckTimeout": 15, "sendLoadingState": True,
                           "models": {"slow": {"cmd": upstreams.cmd("--startup-delay", "6", name="slow")}}})
    pieces = []
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "slow", "stream": True}) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and b"reasoning_content" in line:
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"]["reasoning_content"])
    done = next(i for i, p in enumerate(pieces) if "Done! (" in p)
    assert all(len(p) <= 5 for p in pieces[:done - 1])  # typed, five characters at a time
    text = "".join(pieces)
    assert text.startswith("\u2501" * 5 + "\nllama-swap loading model: slow\n.")
    assert any(remark in text for remark in LoadingStream.REMARKS)  # the first comes within 2-5 s
    assert pieces[done].endswith("s)\n" + "\u2501" * 5 + "\n \n")


async def test_loading_state_ends_the_stream_with_the_error_when_the_start_fails(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"broken": {
        "cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.5", name="broken"), "sendLoadingState": True}}})
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "broken", "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            text = (await r.read()).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    said = "".join(event["choices"][0]["delta"]["reasoning_content"] for event in events[:-1])
    assert "llama-swap loading model: broken" in said
    assert "Done!" not in said
    assert events[-1]["error"]["message"].startswith("unspecific error: upstream command exited prematurely")
    assert text.endswith("\n\n")  # a whole event, the last one


async def test_a_start_that_fails_under_loading_state_raises_in_the_sdk_and_is_recorded_as_failed(in_process,
                                                                                                  upstreams):
    import openai

    ls = await in_process({"healthCheckTimeout": 15, "models": {"broken": {
        "cmd": upstreams.cmd("--startup-delay", "5", "--exit-after", "0.5", name="broken"), "sendLoadingState": True}}})
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    reasoning = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            reasoning.append((chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or "")
    assert "upstream command exited prematurely" in str(raised.value)
    assert "llama-swap loading model: broken" in "".join(reasoning)  # what was said before the error still came
    await client.close()
    async with aiohttp.ClientSession() as s:
        async def row():
            async with s.get(ls.url + "/api/metrics/activity") as r:
                return (await r.json())["data"]
        for _ in range(100):
            if rows := await row():
                break
            await asyncio.sleep(0.05)
    [entry] = rows
    assert entry["resp_status_code"] == 500
    assert entry["error_msg"].startswith("unspecific error: upstream command exited prematurely"), entry


async def test_loading_state_is_not_used_for_ready_models_or_non_streaming_requests(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "sendLoadingState": True,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.headers["Content-Type"].startswith("application/json")  # not streaming: no loading text
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
            assert "loading model" not in (await r.read()).decode()  # ready: straight through


async def test_a_websocket_is_relayed_both_ways_through_upstream(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ls.url + "/upstream/m/ws", protocols=("echo-protocol",)) as ws:
            assert ws.protocol == "echo-protocol"
            await ws.send_str("hello")
            assert (await ws.receive_str(timeout=10)) == "echo: hello"
            await ws.send_bytes(b"\x00\x01binary")
            assert (await ws.receive_bytes(timeout=10)) == b"\x00\x01binary"
            async with s.get(ls.url + "/running") as r:
                assert [e["model"] for e in (await r.json())["running"]] == ["m"]


async def raw_upgrade(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A websocket upgrade request sent by hand, and the whole answer (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode()
    status_line, *header_lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 30)
    writer.close()
    return int(status_line.split()[1]), headers, body


async def test_a_refused_websocket_upgrade_is_passed_through_as_the_upstream_answered(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    for status in (403, 200, 426):
        got, headers, body = await raw_upgrade(ls.port, f"/upstream/m/_responder/refuse?status={status}")
        assert (got, headers.get("x-refused"), body) == (status, "yes", f"refused with {status}".encode()), headers
    got, headers, body = await raw_upgrade(ls.port, "/upstream/m/v1/models")  # a route that is no websocket at all
    assert got == 200 and json.loads(body)["model"] == "m"


async def test_a_websocket_to_a_peer_model_is_relayed(in_process, upstreams):
    far_port = free_port()
    far = subprocess.Popen([PY, str(RESPONDER), "--port", str(far_port), "--name", "far",
                            "--pid-file", str(upstreams.pid_file)])
    try:
        assert wait_until(lambda: port_open(far_port), 20), "the far responder did not start"
        ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}},
                               "peers": {"p": {"proxy": f"http://127.0.0.1:{far_port}", "models": ["far-model"]}}})
        async with aiohttp.ClientSession() as s:
            for path in ("/upstream/far-model/ws", "/upstream/p/far-model/ws"):
                async with s.ws_connect(ls.url + path) as ws:
                    await ws.send_str("over there")
                    assert (await ws.receive_str(timeout=10)) == "echo: over there"
        got, headers, body = await raw_upgrade(ls.port, "/upstream/far-model/_responder/refuse?status=401")
        assert (got, body) == (401, b"refused with 401")
    finally:
        far.terminate()
        far.wait(10)


async def test_ignored_websockets_cannot_start_a_model_but_pass_once_it_runs(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {
        "cmd": upstreams.cmd(name="m"), "compat": {"ignoreWebsockets": True}}}})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(ls.url + "/upstream/m/ws")
        assert refused.value.status == 409
        assert upstreams.pids() == []
        async with s.get(ls.url + "/upstream/m/") as r:  # loads it
            assert r.status == 200
        async with s.ws_connect(ls.url + "/upstream/m/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive_str(timeout=10)) == "echo: x"


async def test_comfyui_passthrough_starts_only_from_its_root_page(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"comfyui_auto": {"cmd": upstreams.cmd(name="comfy")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/comfyui?x=1", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (301, "/comfyui/?x=1")
        async with s.get(ls.url + "/comfyui/api/queue") as r:
            body = await r.json()
            assert r.status == 409
            assert body["error"]["message"] == "model comfyui_auto is not loaded; only /comfyui/ can start it"
        async with s.get(ls.url + "/comfyui/") as r:
            assert r.status == 200 and "responder comfy" in await r.text()
        async with s.get(ls.url + "/comfyui/api/x%2Fy?q=1") as r:
            echo = (await r.json())["echo"]
            assert (echo["path"], echo["query"]) == ("/api/x%2Fy", "q=1")


async def test_comfyui_without_its_model_is_a_404(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/comfyui/") as r:
            assert r.status == 404
            assert (await r.json())["error"]["message"] == "local model comfyui_auto not found"


def test_filters_edit_every_copy_of_a_duplicated_key_and_never_a_model_path():
    config = parse_config("""
models:
  m:
    cmd: srv --port ${PORT}
    filters:
      stripParams: "model.x, stop"
      setParams: {max_tokens: 64, model.name: evil}
""")
    body = b'{"model":"m","max_tokens":1,"stop":["a"],"max_tokens":99999,"stop":"b"}'
    assert apply_filters(body, config.models["m"].filters, "m") == b'{"model":"m","max_tokens":64,"max_tokens":64}'


async def test_dot_segments_are_redirected_to_the_clean_path_before_anything_else(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    for path, location in (("/upstream/m/a/../../running", "/upstream/running"),
                           ("/upstream/m/%2e%2e/x", "/upstream/x"), ("//running", "/running")):
        # A raw request: HTTP clients clean such paths themselves before sending them.
        reader, writer = await asyncio.open_connection("127.0.0.1", ls.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = (await reader.read()).decode().split("\r\n\r\n")[0]
        writer.close()
        assert head.startswith("HTTP/1.1 301") and f"Location: {location}" in head, (path, head)
    assert upstreams.pids() == []


async def test_a_local_model_wins_over_a_peer_with_the_same_name_on_upstream(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"shared": {"cmd": upstreams.cmd(name="local-one")}},
                           "peers": {"p": {"proxy": f"http://127.0.0.1:{free_port()}", "models": ["shared"]}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/upstream/shared/_responder/info") as r:
            assert r.status == 200 and (await r.json())["name"] == "local-one"


async def test_an_open_websocket_does_not_hold_up_shutdown(start_llama_swap, upstreams):
    import time

    ls = start_llama_swap({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ls.url + "/upstream/m/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive_str(timeout=10)) == "echo: x"
            began = time.monotonic()
            ls.proc.terminate()
            message = await ws.receive(timeout=20)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert ls.proc.wait(20) == 0
    assert time.monotonic() - began < 15


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class ForwardProxy:
    """An HTTP proxy as HTTP_PROXY names one: it takes absolute-form requests and sends them on
    to 127.0.0.1 (so `*.example.test` names resolve only through it), noting each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import urllib.parse

        line = await reader.readline()
        method, target, version = line.split()
        self.targets.append(target.decode())
        url = urllib.parse.urlsplit(target.decode())
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", url.port)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        up_writer.write(b" ".join([method, path.encode(), version]) + b"\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.server.close()


async def test_peers_and_remote_upstreams_go_through_the_proxy_the_environment_names(tmp_path, upstreams, monkeypatch):
    far_port = free_port()
    far = subprocess.Popen([PY, str(RESPONDER), "--port", str(far_port), "--name", "far",
                            "--pid-file", str(upstreams.pid_file)])
    proxy = ForwardProxy()
    try:
        assert wait_until(lambda: port_open(far_port), 20), "the far responder did not start"
        monkeypatch.setenv("HTTP_PROXY", await proxy.start())
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        config = {"healthCheckTimeout": 15, "startPort": free_port_block(), "models": {
            "local": {"cmd": upstreams.cmd(name="local")},
            "remote": {"cmd": "sleep 600", "proxy": f"http://remote.example.test:{far_port}"}},
            "peers": {"p": {"proxy": f"http://far.example.test:{far_port}", "models": ["far-model"]}}}
        ls = LlamaSwap(tmp_path, config)
        try:
            async with aiohttp.ClientSession() as s:
                for model, answered_by in (("far-model", "far"), ("remote", "far"), ("local", "local")):
                    status, reply = await chat(s, ls, model)
                    assert status == 200 and reply["model"] == answered_by, (model, reply)
        finally:
            assert ls.stop() == 0
        hosts = {target.split("/")[2] for target in proxy.targets}
        assert hosts == {f"far.example.test:{far_port}", f"remote.example.test:{far_port}"}, proxy.targets

        monkeypatch.setenv("NO_PROXY", "far.example.test")  # straight there, where the name does not resolve
        (tmp_path / "no-proxy").mkdir()
        ls = LlamaSwap(tmp_path / "no-proxy", config)
        try:
            async with aiohttp.ClientSession() as s:
                status, reply = await chat(s, ls, "far-model")
            assert status == 502 and "peer proxy error" in reply["error"]["message"], reply
        finally:
            assert ls.stop() == 0
    finally:
        proxy.close()
        far.terminate()
        far.wait(10)


def certificates(where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed with its key: (ca, certificate, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl (the command) makes the test's certificates, and it is not installed here")
    (where / "host.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                    "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    for argv in (["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                  "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=llama-swap test CA",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                 ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "host.key",
                  "-out", "host.csr", "-subj", "/CN=127.0.0.1"],
                 ["x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                  "-days", "2", "-extfile", "host.ext", "-out", "host.pem"]):
        subprocess.run([openssl, *argv], cwd=where, check=True, capture_output=True, timeout=60)
    return where / "ca.pem", where / "host.pem", where / "host.key"


async def chat_upstream(answer, context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """A server in the test's own loop answering chat completions with `answer` (over TLS with
    `context`): its runner, to clean up, and its port."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


async def tls_upstream(certificate: Path, key: Path) -> tuple[web.AppRunner, str]:
    """An https server answering every chat completion as model "tls"."""
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"object": "chat.completion", "model": "tls", "choices": []})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    runner, port = await chat_upstream(answer, context)
    return runner, f"https://127.0.0.1:{port}"


async def test_https_peers_are_verified_against_the_system_certificates(tmp_path, monkeypatch):
    """The certificates are read when first needed, not as llama-swap starts: what verifies an
    https peer (or upstream: the same session) is still the system's store (SSL_CERT_FILE here),
    and a certificate it does not trust fails."""
    ca, certificate, key = certificates(tmp_path)
    runner, url = await tls_upstream(certificate, key)
    config = {"startPort": free_port_block(), "models": {},
              "peers": {"p": {"proxy": url, "models": ["far", "farther"]}}}
    try:
        for trusted in (True, False):
            (workdir := tmp_path / f"trusted-{trusted}").mkdir()
            if trusted:
                monkeypatch.setenv("SSL_CERT_FILE", str(ca))
            else:  # the machine's own store, which has never heard of this CA
                monkeypatch.delenv("SSL_CERT_FILE", raising=False)
            ls = LlamaSwap(workdir, config)
            try:
                async with aiohttp.ClientSession() as s:
                    for model in ("far", "p/farther"):
                        status, reply = await chat(s, ls, model)
                        if trusted:
                            assert status == 200 and reply["model"] == "tls", (model, reply, ls.output())
                        else:
                            assert status == 502, (model, reply)
                            assert "certificate verify failed" in reply["error"]["message"], reply
            finally:
                assert ls.stop() == 0, ls.output()
    finally:
        await runner.cleanup()


async def test_a_cookie_one_client_was_given_never_reaches_the_upstream_for_another(tmp_path):
    """The proxy is not a browser: an upstream's Set-Cookie goes to the client that got it and
    nowhere else, whatever name the upstream has (aiohttp's jar keeps cookies of host names, such
    as the default `proxy: http://localhost:${PORT}`, not of IP addresses)."""
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"object": "chat.completion", "model": "far", "choices": []})
        response.set_cookie("session", f"for-request-{len(seen)}")
        return response

    runner, port = await chat_upstream(answer)
    try:
        ls = LlamaSwap(tmp_path, {"startPort": free_port_block(), "models": {},
                                  "peers": {"p": {"proxy": f"http://localhost:{port}", "models": ["far"]}}})
        try:
            for _ in range(3):  # three clients, each with no cookie of its own
                async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
                    status, reply = await chat(s, ls, "far")
                    assert status == 200, reply
            async with aiohttp.ClientSession() as s:  # a client's own cookie goes up as it sent it
                status, _ = await post_raw(s, ls.url, b'{"model": "far"}', {"Cookie": "mine=1"})
                assert status == 200
        finally:
            assert ls.stop() == 0, ls.output()
    finally:
        await runner.cleanup()
    assert seen == [None, None, None, "mine=1"]
