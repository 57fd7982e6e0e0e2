"""Against the real thing: llama.cpp's llama-server behind llama-swap-py, driven by the SDKs our
users point at it. The server is built once (tests/llama_server.py --build, run by .ci/run);
without it these tests skip."""

from __future__ import annotations

import aiohttp
import pytest

from helpers import eventually, running
from llama_server import binary, tiny_model

pytestmark = pytest.mark.skipif(binary() is None,
                                reason="llama-server is not built: python tests/llama_server.py --build")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return str(tiny_model(tmp_path_factory.mktemp("gguf") / "tiny-random-llama.gguf"))


def llama_config(model_file: str) -> dict:
    cmd = f"{binary()} --host 127.0.0.1 --port ${{PORT}} -m {model_file} -c 1024 -np 2 --threads 2 --no-webui"
    return {"healthCheckTimeout": 60, "models": {"alpha": {"cmd": cmd}, "beta": {"cmd": cmd, "aliases": ["b"]}}}


GENERATE = {"ignore_eos": True}  # random weights: without this an early EOS could end a reply at once


async def test_chat_and_completions_through_a_swap_with_the_openai_sdk(start_llama_swap, upstreams, model_file):
    import openai

    ls = start_llama_swap(llama_config(model_file))
    client = openai.AsyncOpenAI(base_url=ls.url + "/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=8, extra_body=GENERATE)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        stream = await client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=8, stream=True, extra_body=GENERATE)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert len("".join(pieces)) > 0
        async with aiohttp.ClientSession() as s:
            assert [e["model"] for e in await running(s, ls)] == ["beta"]  # alpha was swapped out
        completion = await client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=6,
                                                     extra_body=GENERATE)
        assert completion.choices[0].text and completion.usage.completion_tokens == 6
        stream = await client.completions.create(model="alpha", prompt="Once", max_tokens=6, stream=True,
                                                 extra_body=GENERATE)
        assert "".join([c.choices[0].text async for c in stream if c.choices])
    finally:
        await client.close()


async def test_anthropic_messages_with_the_anthropic_sdk(start_llama_swap, upstreams, model_file):
    import anthropic

    ls = start_llama_swap(llama_config(model_file))
    client = anthropic.AsyncAnthropic(base_url=ls.url, api_key="unused", max_retries=0)
    try:
        message = await client.messages.create(model="alpha", max_tokens=8,
                                               messages=[{"role": "user", "content": "hi"}], extra_body=GENERATE)
        assert message.content[0].text and message.usage.output_tokens == 8
        async with client.messages.stream(model="alpha", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                          extra_body=GENERATE) as stream:
            text = "".join([piece async for piece in stream.text_stream])
        assert text
    finally:
        await client.close()


async def test_llama_server_routes_and_passthrough(start_llama_swap, upstreams, model_file):
    ls = start_llama_swap(llama_config(model_file))
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/completion",
                          json={"model": "alpha", "prompt": "Hello", "n_predict": 5, **GENERATE}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["content"] and body["timings"]["predicted_n"] == 5
        async with s.get(ls.url + "/props", params={"model": "alpha"}) as r:
            assert r.status == 200 and "default_generation_settings" in await r.json()
        async with s.get(ls.url + "/upstream/alpha/props") as r:
            direct_props = await r.json()
        assert direct_props["model_path"].endswith("tiny-random-llama.gguf")
        # This vocabulary has no fill-in-the-middle tokens: whatever llama-server says, the client hears.
        async with s.post(ls.url + "/infill", json={"model": "alpha", "input_prefix": "def f(", "input_suffix": ")",
                                                    "n_predict": 4}) as r:
            proxied = (r.status, r.headers["Content-Type"].split(";")[0])
        async with s.post(ls.url + "/upstream/alpha/infill", json={"input_prefix": "def f(", "input_suffix": ")",
                                                                   "n_predict": 4}) as r:
            assert (r.status, r.headers["Content-Type"].split(";")[0]) == proxied


async def test_token_figures_come_from_llama_servers_timings(start_llama_swap, upstreams, model_file):
    ls = start_llama_swap(llama_config(model_file))
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/completion",
                          json={"model": "alpha", "prompt": "Hello there", "n_predict": 7, **GENERATE}) as r:
            assert r.status == 200
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "alpha", "max_tokens": 9, "stream": True,
                                                                 "messages": [{"role": "user", "content": "hi"}],
                                                                 **GENERATE}) as r:
            assert r.status == 200
            await r.read()

        async def recorded() -> list[dict]:
            async with s.get(ls.url + "/api/metrics/activity?order=asc") as r:
                rows = (await r.json())["data"]
            return rows if len(rows) == 2 else []
        assert await eventually(recorded, 15)
        completion, chat = await recorded()
    for row, generated in ((completion, 7), (chat, 9)):
        tokens = row["tokens"]
        assert tokens["output_tokens"] == generated and tokens["input_tokens"] > 0, row
        assert tokens["prompt_per_second"] > 0 and tokens["tokens_per_second"] > 0, row
        assert tokens["cache_tokens"] >= 0, row  # llama-server reports cache_n


async def test_streams_back_to_back_all_reach_the_model(in_process, upstreams, model_file):
    """llama-server closes its connection just after a streamed answer: the next request must
    still get through (it once met the closed connection and was answered 502)."""
    ls = await in_process(llama_config(model_file))
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.post(ls.url + "/completion", json={"model": "alpha", "prompt": "hello " * 300, "n_predict": 4,
                                                             "stream": True, **GENERATE}) as r:
                assert r.status == 200, await r.text()
                await r.read()
