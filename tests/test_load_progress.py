"""Load progress and ETA (issue 10): how far a starting model server has got, read from what it
prints, and how long it probably has left.

First LoadProgress and load_eta on their own, fed output the way real servers print it (llama.cpp's
dots, vLLM's tqdm bar, llama-server's child-state lines, logs that say nothing) and junk. Then
through a real llama-swap with responder upstreams that print progress while they "load"
(--load-progress): /v1/models, the modelStatus events of /api/events and the loading-state
stream. Timing assertions are orderings or lower bounds where the clock must have passed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import aiohttp
import pytest

from helpers import eventually
from llama_swap import LoadProgress, load_eta
from test_logs_events import watching_events

HEALTH_TIMEOUT = 30
START_BOUND = 30.0  # seconds a responder with a few seconds of startup delay may take on a slow machine
LOADING_KEYS = {"elapsed_s", "progress", "eta_s"}


# -- samples -------------------------------------------------------------------------------------

LLAMA_CPP_HEAD = b"""\
llama_model_loader: loaded meta data with 29 key-value pairs and 291 tensors from \
/models/Meta-Llama-3-8B-Instruct.Q4_K_M.gguf (version GGUF V3 (latest))
llm_load_print_meta: model size       = 4.58 GiB (4.89 BPW)
llm_load_print_meta: general.name     = Meta-Llama-3-8B-Instruct
llm_load_tensors: ggml ctx size =    0.27 MiB
llm_load_tensors: offloading 32 repeating layers to GPU
llm_load_tensors: offloaded 33/33 layers to GPU
llm_load_tensors:        CPU buffer size =   281.81 MiB
llm_load_tensors:      CUDA0 buffer size =  4403.49 MiB
"""
LLAMA_CPP_TAIL = b"""\
llama_new_context_with_model: n_ctx      = 8192
llama_kv_cache_init:      CUDA0 KV buffer size =  1024.00 MiB
"""

# A recent llama-server that prints no progress dots: it says a lot about loading, but not how far.
LLAMA_SERVER_SILENT = b"""\
build: 5410 (3bc1dbd4) with cc (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0 for x86_64-linux-gnu
system info: n_threads = 8, n_threads_batch = 8, total_threads = 16
main: HTTP server is listening, hostname: 127.0.0.1, port: 8080, http threads: 15
main: loading model
srv    load_model: loading model '/models/Qwen3-8B-Q4_K_M.gguf'
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4090) - 23589 MiB free
llama_model_loader: loaded meta data with 28 key-value pairs and 399 tensors from /models/Qwen3-8B-Q4_K_M.gguf
print_info: file size   = 4.68 GiB (4.90 BPW)
load: special tokens cache size = 26
load_tensors: loading model tensors, this can take a while... (mmap = true)
load_tensors: offloaded 37/37 layers to GPU
load_tensors:        CUDA0 model buffer size =  4403.50 MiB
llama_context: n_ctx_per_seq (4096) < n_ctx_train (40960) -- the full capacity of the model will not be utilized
common_init_from_params: warming up the model with an empty run - please wait ... (--no-warmup to disable)
srv          init: initializing slots, n_slots = 1
main: model loaded
main: server is listening on http://127.0.0.1:8080 - starting the main loop
srv  update_slots: all slots are idle
"""

VLLM_HEAD = b"INFO 05-12 10:00:01 [gpu_model_runner.py:1329] Starting to load model Qwen/Qwen2.5-7B-Instruct...\n"
# tqdm starts each update with \r and ends the bar with a newline.
VLLM_SHARDS = [
    (b"\rLoading safetensors checkpoint shards:   0% Completed | 0/4 [00:00<?, ?it/s]", 0.0),
    (b"\rLoading safetensors checkpoint shards:  25% Completed | 1/4 [00:01<00:03,  1.10s/it]", 0.25),
    (b"\rLoading safetensors checkpoint shards:  50% Completed | 2/4 [00:02<00:02,  1.05s/it]", 0.5),
    (b"\rLoading safetensors checkpoint shards:  75% Completed | 3/4 [00:03<00:01,  1.02s/it]", 0.75),
    (b"\rLoading safetensors checkpoint shards: 100% Completed | 4/4 [00:04<00:00,  1.01s/it]", 1.0),
]
VLLM_TAIL = b"\nINFO 05-12 10:00:06 [default_loader.py:272] Loading weights took 4.12 seconds\n"


def fed(*chunks: bytes) -> LoadProgress:
    progress = LoadProgress()
    for chunk in chunks:
        progress.feed(chunk)
    return progress


# -- LoadProgress --------------------------------------------------------------------------------


def test_nothing_is_known_before_the_server_says_anything():
    assert LoadProgress().value is None


def test_llama_cpp_dots_count_one_percent_each_as_they_arrive_in_any_chunks():
    progress = fed(LLAMA_CPP_HEAD)
    assert progress.value is None  # the loader line alone says nothing about how far
    progress.feed(b"." * 20)
    assert progress.value == pytest.approx(0.20)
    progress.feed(b"." * 23)
    assert progress.value == pytest.approx(0.43)
    progress.feed(b"." * 57 + b"\n" + LLAMA_CPP_TAIL)
    assert progress.value == pytest.approx(1.0)


def test_a_loader_line_split_across_chunks_still_arms_the_dots():
    assert fed(b"llm_load_ten", b"sors: offloaded 33/33 layers to GPU\n", b"." * 30).value == pytest.approx(0.30)
    assert fed(b"load_tensors: loading model tensors\n", b"." * 7).value == pytest.approx(0.07)  # recent llama.cpp


def test_dots_without_a_loader_line_before_them_are_not_progress():
    assert fed(b"Waiting for the GPU\n", b"....................\n").value is None


def test_a_recent_llama_server_log_without_dots_says_nothing_about_progress():
    assert fed(LLAMA_SERVER_SILENT).value is None
    # The same log a line at a time.
    assert fed(*LLAMA_SERVER_SILENT.splitlines(keepends=True)).value is None


def test_tqdm_shard_updates_separated_by_carriage_returns_are_read():
    assert fed(VLLM_HEAD).value is None  # "load", but no percentage
    progress = fed(VLLM_HEAD, VLLM_SHARDS[0][0])
    for (_, before), (update, _) in zip(VLLM_SHARDS, VLLM_SHARDS[1:]):
        progress.feed(update)  # its \r ends the update before it
        assert progress.value is not None and progress.value >= before, update
    progress.feed(VLLM_TAIL)
    assert progress.value == pytest.approx(1.0)


def test_the_latest_tqdm_update_counts_as_soon_as_it_is_printed():
    # tqdm prints "\r<bar>" and then nothing until the next shard, which may take a minute.
    progress = fed(VLLM_HEAD)
    for update, shown in VLLM_SHARDS:
        progress.feed(update)
        assert progress.value == pytest.approx(shown), update


def test_shard_downloads_count_too():
    bar = "\rDownloading shards:  50%|\u2588\u2588\u2588\u2588\u2588     | 2/4 [00:30<00:30, 15.0s/it]\n"
    assert fed(bar.encode()).value == pytest.approx(0.5)


def test_child_state_lines_give_the_value_once_the_line_is_whole():
    line = b'cmd_child_to_router:state:{"state":"loading","payload":{"value":0.43}}\n'
    progress = fed(line[:40])
    assert progress.value is None
    progress.feed(line[40:])
    assert progress.value == pytest.approx(0.43)
    progress.feed(b'cmd_child_to_router:state:{"state":"loading","payload":{"value":0.9}}\n')
    assert progress.value == pytest.approx(0.9)


@pytest.mark.parametrize("junk", [
    b"GPU utilisation 90%\n",
    b"cmd_child_to_router:state:{not json}\n",
    b'cmd_child_to_router:state:{"payload":null}\n',
    b'cmd_child_to_router:state:{"payload":{"value":"soon"}}\n',
    b'cmd_child_to_router:state:["payload"]\n',
    b"\xff\xfe\x00\x01 load \xc3\x28 %\n",
    b"x" * 100_000,
], ids=["percent-not-about-loading", "bad-json", "null-payload", "text-value", "list", "bad-utf8", "endless-line"])
def test_junk_is_not_progress(junk):
    assert fed(junk).value is None
    assert fed(LLAMA_CPP_HEAD, b"." * 10 + b"\n", junk).value == pytest.approx(0.10)  # nor does it undo what was read


@pytest.mark.parametrize("said", [
    b'cmd_child_to_router:state:{"payload":{"value":7}}\n',
    b'cmd_child_to_router:state:{"payload":{"value":-0.5}}\n',
    b'cmd_child_to_router:state:{"payload":{"value":NaN}}\n',
    b'cmd_child_to_router:state:{"payload":{"value":Infinity}}\n',
    b"Loading checkpoint shards: 250%\n",
    LLAMA_CPP_HEAD + b"." * 150,
], ids=["above-one", "negative", "nan", "infinity", "percent-above-100", "too-many-dots"])
def test_progress_stays_a_share_between_0_and_1_whatever_is_said(said):
    value = fed(said).value
    assert value is None or (math.isfinite(value) and 0 <= value <= 1), value


# -- load_eta ------------------------------------------------------------------------------------


@pytest.mark.parametrize("elapsed, progress, past, eta", [
    (10.0, 0.25, [], 30.0),  # a quarter in ten seconds: three quarters in thirty
    (4.0, 0.5, [100.0], 4.0),  # its own progress wins over the past
    (7.0, 1.0, [], 0.0),
    (5.0, None, [10.0, 30.0, 20.0], 15.0),  # the median past load, less the time so far
    (5.0, 0.04, [20.0], 15.0),  # under 5 % the progress says too little: the past instead
    (1.0, 0.04, [], None),
    (1.0, None, [], None),
    (12.0, None, [10.0], None),  # later than it ever took: unknown, not negative
])
def test_load_eta(elapsed, progress, past, eta):
    assert load_eta(elapsed, progress, past) == (None if eta is None else pytest.approx(eta))


# -- end to end: helpers --------------------------------------------------------------------------


def config(models: dict[str, dict]) -> dict:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, "models": models}


async def listed_status(session: aiohttp.ClientSession, ls, model: str) -> dict:
    async with session.get(ls.url + "/v1/models") as r:
        assert r.status == 200
        return next(record["status"] for record in (await r.json())["data"] if record["id"] == model)


async def load(session: aiohttp.ClientSession, ls, model: str) -> None:
    """Start `model` as the UI's Load button does: the answer comes once it is ready."""
    async with session.post(f"{ls.url}/api/models/load/{model}") as r:
        assert r.status == 200, await r.text()


async def load_polling_status(session: aiohttp.ClientSession, ls, model: str) -> list[dict]:
    """Load `model` while polling /v1/models: the `loading` statuses seen meanwhile, in order."""
    loading = asyncio.create_task(load(session, ls, model))
    deadline = asyncio.get_running_loop().time() + START_BOUND
    seen = []
    try:
        while not loading.done():
            assert asyncio.get_running_loop().time() < deadline, f"{model} took too long to load"
            if (status := await listed_status(session, ls, model))["value"] == "loading":
                seen.append(status)
            await asyncio.sleep(0.1)
        await loading
    finally:
        loading.cancel()
    return seen


def entry(statuses: list[dict], model: str) -> dict:
    return next(status for status in statuses if status["id"] == model)


# -- end to end: /v1/models, /api/events, the loading stream --------------------------------------


@pytest.mark.parametrize("style", ["dots", "percent"])
async def test_v1_models_shows_the_load_rising_with_an_eta_then_loaded(in_process, upstreams, style):
    ls = await in_process(config({"m": {"cmd": upstreams.cmd("--startup-delay", "3", "--load-progress", style,
                                                             name="m")}}))
    async with aiohttp.ClientSession() as s:
        assert await listed_status(s, ls, "m") == {"value": "unloaded"}
        seen = await load_polling_status(s, ls, "m")
        assert await listed_status(s, ls, "m") == {"value": "loaded"}
    assert seen and all(set(status) == {"value"} | LOADING_KEYS for status in seen), seen
    elapsed = [status["elapsed_s"] for status in seen]
    assert elapsed == sorted(elapsed), seen
    progress = [status["progress"] for status in seen if status["progress"] is not None]
    assert progress == sorted(progress) and progress[0] < progress[-1], seen  # rose between polls
    told = [status for status in seen if status["progress"] is not None and status["progress"] >= 0.05]
    assert told and all(isinstance(status["eta_s"], (int, float)) and status["eta_s"] >= 0 for status in told), seen


async def test_without_progress_output_the_second_start_gets_its_eta_from_the_first(in_process, upstreams):
    delay = 2.0
    ls = await in_process(config({"m": {"cmd": upstreams.cmd("--startup-delay", str(delay), name="m")}}))
    async with aiohttp.ClientSession() as s:
        first = await load_polling_status(s, ls, "m")
        async with s.post(ls.url + "/api/models/unload/m") as r:
            assert r.status == 200
        assert await listed_status(s, ls, "m") == {"value": "unloaded"}
        second = await load_polling_status(s, ls, "m")
    assert first and all(status["progress"] is None and status["eta_s"] is None for status in first), first
    assert all(status["progress"] is None for status in second), second
    with_eta = [status for status in second if status["eta_s"] is not None]
    assert with_eta, second
    # What is left of the first start's duration: elapsed + ETA stays put, at no less than the delay.
    totals = [status["elapsed_s"] + status["eta_s"] for status in with_eta]
    assert max(totals) - min(totals) <= 0.25 and min(totals) >= delay - 0.1, with_eta


async def test_load_times_kept_in_the_store_give_the_first_start_after_a_restart_its_eta(
        start_llama_swap, upstreams, tmp_path):
    cfg = {**config({"m": {"cmd": upstreams.cmd("--startup-delay", "2", name="m")}}),
           "store": {"path": str(tmp_path / "store.db")}}
    first = start_llama_swap(cfg)
    async with aiohttp.ClientSession() as s:
        await load(s, first, "m")
    assert first.stop() == 0
    second = start_llama_swap(cfg)
    async with aiohttp.ClientSession() as s:
        statuses = await load_polling_status(s, second, "m")
    assert statuses and any(status["eta_s"] is not None for status in statuses), statuses


async def test_events_republish_a_starting_models_load_every_second(in_process, upstreams):
    ls = await in_process(config({
        "m": {"cmd": upstreams.cmd("--startup-delay", "3", "--load-progress", "dots", name="m")},
        "idle": {"cmd": upstreams.cmd(name="idle")}}))
    async with aiohttp.ClientSession() as s, watching_events(s, ls) as events:
        assert await eventually(lambda: events.of("modelStatus"), 10)
        await load(s, ls, "m")
        assert await eventually(lambda: entry(events.of("modelStatus")[-1], "m")["state"] == "ready", 10)
        published = events.of("modelStatus")
    starting = [entry(statuses, "m") for statuses in published if entry(statuses, "m")["state"] == "starting"]
    assert len(starting) >= 2, starting
    assert all(set(status["loading"]) == LOADING_KEYS for status in starting), starting
    elapsed = [status["loading"]["elapsed_s"] for status in starting]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 1.0, elapsed  # a second apart, not a burst
    assert all("loading" not in entry(statuses, "idle") for statuses in published)
    assert all("loading" not in entry(statuses, "m") for statuses in published
               if entry(statuses, "m")["state"] != "starting")


async def test_the_loading_stream_says_how_far_the_load_has_got(in_process, upstreams):
    # Remarks come 2-5 s into the stream, then every 5-9 s: a ten-second load has room for one.
    ls = await in_process(config({"m": {"cmd": upstreams.cmd("--startup-delay", "10", "--load-progress", "dots",
                                                             name="m"),
                                        "sendLoadingState": True}}))
    reasoning, content = [], []
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: {"):
                    delta = json.loads(line[len(b"data: "):])["choices"][0]["delta"]
                    reasoning.append(delta.get("reasoning_content") or "")
                    content.append(delta.get("content") or "")
    said = "".join(reasoning)
    remark = re.search(r"Loading \d+%", said)
    assert remark and remark.start() < said.index("Done! ("), said
    assert "".join(content) == "tok0 tok1 tok2 tok3 tok4 "
