"""The vram router (issue 10): models load while they fit the GPUs' memory.

Units first: sizes in the config (`parse_size`, the `vram` keys and their errors), `spread`,
`vram_plan` (the pure eviction decision, with sleepers) and `VramBook.apply` (what a reading of the GPUs
teaches the router). Then a real llama-swap on fake GPUs (`LLAMA_SWAP_FAKE_VRAM`, a JSON file
that responders started with `--fake-vram` enter their pid in once loaded): models never
measured run alone, measured or hinted ones run side by side while they fit, the least
recently used idle one makes room, a busy one is never stopped, a swap waits for evicted
memory to show free (up to `releaseWait`), and /running, /v1/models and /metrics show the
footprints and budgets. Last, the router without any GPU, and on a real NVIDIA GPU where the
machine has one (skipped elsewhere).

The router reads the GPUs every 2 s (VRAM_EVERY), so a footprint shows up within a few
seconds of a load; timing assertions are orderings against wall-clock moments written by the
responders and llama-swap's own timestamped log, never tight bounds.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PY, RESPONDER, chat, eventually, running
from llama_swap import (
    ConfigError,
    GpuMemory,
    VramBook,
    VramReading,
    init_nvml,
    parse_config,
    parse_rfc3339,
    parse_size,
    shutdown_nvml,
    spread,
    vram_plan,
)

GiB = 1024**3
MiB = 1024**2
HEALTH_TIMEOUT = 15  # the minimum healthCheckTimeout
START_BOUND = 20.0  # seconds a cold responder may take to become ready on a slow machine
MEASURE_BOUND = 15.0  # seconds until a ready model's footprint is read (every 2 s, on a busy machine)
TIMED_DEBUG_LOG = {"logLevel": "debug", "logTimeFormat": "rfc3339nano"}  # start commands, stamped


# -- sizes and config ----------------------------------------------------------------------

@pytest.mark.parametrize("value, size", [
    ("20GiB", 20 * GiB), ("20 GB", 20 * 1000**3), ("512M", 512 * MiB), ("1.5G", int(1.5 * GiB)),
    ("8gib", 8 * GiB), ("2T", 2 * 1024**4), ("7 kb", 7000), ("1024", 1024), (1024, 1024), (0, 0),
])
def test_parse_size_reads_units_binary_unless_they_say_decimal(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["lots", "", "GiB", "-1", -1, "1e9", "20 GiBs", True, float("nan")])
def test_parse_size_refuses_what_is_not_a_size(value):
    assert parse_size(value) is None


SERVE = "cmd: 'srv --port ${PORT}'"


def vram_router_yaml(settings: str = "{}", model_vram: str | None = None) -> str:
    vram = f", vram: {model_vram}" if model_vram is not None else ""
    return f"routing: {{router: {{use: vram, settings: {{vram: {settings}}}}}}}\nmodels: {{m: {{{SERVE}{vram}}}}}\n"


@pytest.mark.parametrize("yaml_text, key, phrase", [
    pytest.param(vram_router_yaml(model_vram="lots"), "models.m.vram", "'lots' is not a size", id="model-size"),
    pytest.param(vram_router_yaml(model_vram="{x: 1GiB}"), "models.m.vram", "GPU index 'x' is not a number >= 0",
                 id="gpu-index-not-a-number"),
    pytest.param(vram_router_yaml(model_vram="{-1: 1GiB}"), "models.m.vram", "GPU index -1", id="gpu-index-negative"),
    pytest.param(vram_router_yaml(model_vram="{true: 1GiB}"), "models.m.vram", "GPU index", id="gpu-index-bool"),
    pytest.param(vram_router_yaml(model_vram="{0: -5}"), "models.m.vram", "is not a size", id="negative-size"),
    pytest.param(vram_router_yaml(model_vram=".inf"), "models.m.vram", "is not a size", id="infinite-size"),
    pytest.param(vram_router_yaml("{reserve: lots}"), "routing.router.settings.vram.reserve", "'lots' is not a size",
                 id="reserve"),
    pytest.param(vram_router_yaml("{releaseWait: -1}"), "routing.router.settings.vram.releaseWait", "must be >= 0",
                 id="release-wait-negative"),
    pytest.param(vram_router_yaml("{releaseWait: soon}"), "routing.router.settings.vram.releaseWait",
                 "expected an integer", id="release-wait-not-a-number"),
])
def test_a_bad_vram_setting_is_one_line_naming_its_key(yaml_text, key, phrase):
    with pytest.raises(ConfigError) as error:
        parse_config(yaml_text)
    message = str(error.value)
    assert "\n" not in message and message.startswith(key + ":") and phrase in message, message


def test_vram_settings_are_read_per_gpu_or_for_all_gpus():
    config = parse_config(vram_router_yaml("{reserve: {0: 1GiB}, releaseWait: 5}", "{0: 10GiB, 1: 8 GiB}"))
    assert config.routing.router == "vram"
    assert config.routing.vram_reserve == {0: GiB} and config.routing.vram_release_wait == 5
    assert config.models["m"].vram == {0: 10 * GiB, 1: 8 * GiB}
    config = parse_config(vram_router_yaml(model_vram="20GiB"))
    assert config.routing.vram_reserve == {} and config.routing.vram_release_wait == 30
    assert config.models["m"].vram == {None: 20 * GiB}


def test_a_spillover_selector_over_local_models_is_accepted_by_the_vram_router():
    # Whether its targets fit together is known only once they are measured, not from the config.
    config = parse_config(vram_router_yaml().replace("models: {m: {", "models: {n: {" + SERVE + "}, m: {")
                          + "selectors: {s: {strategy: spillover, targets: [m, n]}}\n")
    assert config.selectors["s"].targets == ["m", "n"]


# -- the eviction decision -------------------------------------------------------------------

@pytest.mark.parametrize("sizes, gpus, per_gpu", [
    ({None: 10 * GiB}, [0, 1], {0: 5 * GiB, 1: 5 * GiB}),
    ({0: 6 * GiB, 1: 2 * GiB}, [0, 1], {0: 6 * GiB, 1: 2 * GiB}),
    ({None: 8 * GiB}, [0], {0: 8 * GiB}),
    ({None: 8 * GiB}, [], {}),  # no GPU read yet: nothing to split over
])
def test_spread_splits_a_size_for_all_gpus_evenly(sizes, gpus, per_gpu):
    assert spread(sizes, gpus) == per_gpu


@pytest.mark.parametrize("need, running_models, budget, evicted", [
    pytest.param({0: 8}, [], {0: 23}, set(), id="nothing-running"),
    pytest.param({0: 8}, [("a", {0: 8})], {0: 23}, set(), id="fits-beside-what-runs"),
    pytest.param({0: 12}, [("a", {0: 8}), ("b", {0: 8})], {0: 23}, {"a"}, id="first-of-running-goes-first"),
    pytest.param({0: 12}, [("b", {0: 8}), ("a", {0: 8})], {0: 23}, {"b"}, id="running-order-decides"),
    pytest.param({0: 20}, [("a", {0: 8}), ("b", {0: 8})], {0: 23}, {"a", "b"}, id="as-many-as-it-takes"),
    pytest.param({0: 4, 1: 1}, [("a", {0: 8}), ("b", {1: 8})], {0: 10, 1: 10}, {"a"}, id="every-gpu-must-fit"),
    pytest.param({0: 4}, [("a", None), ("b", {0: 8})], {0: 23}, {"a"}, id="running-model-never-measured-goes"),
    pytest.param(None, [("a", {0: 1}), ("b", {0: 1})], {0: 23}, {"a", "b"}, id="target-never-measured-runs-alone"),
    pytest.param({0: 1}, [("a", {0: 1})], {}, {"a"}, id="no-gpu-known-runs-alone"),
    pytest.param({0: 30}, [("a", {0: 1}), ("b", {0: 1})], {0: 23}, {"a", "b"}, id="too-big-even-alone-runs-alone"),
])
def test_vram_evictions_stop_the_cheapest_models_until_the_target_fits(need, running_models, budget, evicted):
    assert vram_plan(need, [(name, held, None) for name, held in running_models], budget) == (set(), evicted)


def test_vram_evictions_spare_a_model_that_holds_nothing_where_room_is_short():
    # Stopping `a` frees GPU 0 only; the target needs room on GPU 1, which only `b` can give.
    assert vram_plan({1: 8}, [("a", {0: 8}, None), ("b", {1: 8}, None)], {0: 10, 1: 10}) == (set(), {"b"})


@pytest.mark.parametrize("need, running_models, asleep, budget, plan", [
    pytest.param({0: 12}, [("a", {0: 8}, {0: 1}), ("b", {0: 8}, None)], [], {0: 23}, ({"a"}, set()),
                 id="a-model-that-can-sleep-sleeps"),
    pytest.param({0: 12}, [("a", {0: 8}, None), ("b", {0: 8}, {0: 1})], [("s", {0: 4})], {0: 29}, (set(), {"s"}),
                 id="sleeping-models-stop-first"),
    pytest.param({0: 12}, [("a", {0: 8}, None)], [("s", {0: 1}), ("t", {0: 1})], {0: 23}, (set(), set()),
                 id="what-sleepers-keep-counts-and-fits"),
    pytest.param({0: 12}, [("a", {0: 8}, {0: 1})], [("s", {0: 1}), ("t", {0: 4})], {0: 20}, (set(), {"s", "t"}),
                 id="all-sleepers-stop-before-an-awake-one-sleeps"),
    pytest.param({0: 16}, [("a", {0: 8}, {0: 6}), ("b", {0: 8}, {0: 4})], [], {0: 23}, ({"b"}, {"a"}),
                 id="sleeping-not-enough-stops-it"),
    pytest.param({0: 12}, [("a", {0: 8}, {})], [], {0: 12}, ({"a"}, set()),
                 id="never-seen-asleep-keeps-nothing"),
    pytest.param(None, [("a", {0: 1}, {0: 1})], [("s", {0: 1})], {0: 23}, (set(), {"a", "s"}),
                 id="target-never-measured-runs-alone-everything-stops"),
])
def test_vram_plan_puts_models_to_sleep_and_stops_sleeping_ones_first(need, running_models, asleep, budget, plan):
    assert vram_plan(need, running_models, budget, asleep) == plan


# -- what a reading teaches the router ---------------------------------------------------------

def reading(used: int, held: dict[str, dict[int, int]]) -> VramReading:
    """One 24 GiB GPU with `used` bytes in use by anyone, our models holding `held`."""
    return VramReading({0: GpuMemory(0, 24 * GiB, used)}, held)


def test_a_new_run_replaces_the_old_measurement():
    book = VramBook(None, {}, {})
    book.apply(reading(8 * GiB, {"a": {0: 8 * GiB}}), {"a": 100}, ())
    book.apply(reading(4 * GiB, {"a": {0: 4 * GiB}}), {"a": 200}, ())
    assert book.measured == {"a": {0: 4 * GiB}}


def test_the_same_run_keeps_the_largest_seen_per_gpu():
    book = VramBook(None, {}, {})
    book.apply(reading(8 * GiB, {"a": {0: 8 * GiB}}), {"a": 100}, ())
    book.apply(reading(6 * GiB, {"a": {0: 4 * GiB, 1: 2 * GiB}}), {"a": 100}, ())
    assert book.measured == {"a": {0: 8 * GiB, 1: 2 * GiB}}


def test_a_run_that_holds_nothing_yet_keeps_what_is_known():
    book = VramBook(None, {}, {})
    book.apply(reading(8 * GiB, {"a": {0: 8 * GiB}}), {"a": 100}, ())
    book.apply(reading(0, {"a": {}}), {"a": 200}, ())
    assert book.measured == {"a": {0: 8 * GiB}}


def test_a_loading_model_counts_at_least_its_hint_and_settles_once_ready():
    # A reading mid-load sees only the CUDA context: that must not shrink what it is known to need.
    book = VramBook(None, {}, {"a": {None: 20 * GiB}})
    book.apply(reading(GiB // 2, {"a": {0: GiB // 2}}), {"a": 100}, {"a"})
    assert book.need("a") == {0: 20 * GiB} and "a" not in book.measured
    book.apply(reading(18 * GiB, {"a": {0: 18 * GiB}}), {"a": 100}, ())  # ready: what it holds now is its footprint
    assert book.need("a") == {0: 18 * GiB}
    book.apply(reading(GiB, {"a": {0: GiB}}), {"a": 300}, {"a"})  # the next run, loading
    assert book.need("a") == {0: 18 * GiB}


def test_others_use_is_what_the_gpu_uses_beyond_our_models_and_shrinks_the_budget():
    book = VramBook(None, {None: GiB}, {})
    book.apply(reading(20 * GiB, {"a": {0: 8 * GiB}, "b": {0: 8 * GiB}}), {"a": 100, "b": 200}, ())
    assert book.others == {0: 4 * GiB}
    assert book.budget() == {0: 24 * GiB - GiB - 4 * GiB}
    # The driver's total can lag behind the processes' figures: never a negative use by others.
    book.apply(reading(10 * GiB, {"a": {0: 8 * GiB}, "b": {0: 8 * GiB}}), {"a": 100, "b": 200}, ())
    assert book.others == {0: 0}


def test_a_measurement_wins_over_the_hint_which_is_spread_over_the_gpus():
    book = VramBook(None, {}, {"a": {None: 10 * GiB}, "b": {None: 10 * GiB}, "c": {}})
    book.apply(VramReading({0: GpuMemory(0, 24 * GiB, 3 * GiB), 1: GpuMemory(1, 24 * GiB, 0)},
                           {"a": {0: 3 * GiB}}), {"a": 100}, ())
    assert book.need("a") == {0: 3 * GiB}
    assert book.need("b") == {0: 5 * GiB, 1: 5 * GiB}
    assert book.need("c") is None


# -- end to end on fake GPUs -------------------------------------------------------------------

def fake_gpus(tmp_path: Path, monkeypatch, *gpus: tuple[int, int]) -> Path:
    """A fake GPU file, (total, used by others) per GPU, that the next llama-swap reads."""
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [{"total": total, "used": used} for total, used in gpus], "processes": {}}))
    monkeypatch.setenv("LLAMA_SWAP_FAKE_VRAM", str(path))
    return path


def fake_processes(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(path.read_text())["processes"]


def holder(upstreams, gpus: Path, name: str, held: str, *args: str, hint: str | None = None) -> dict:
    """A model whose responder holds `held` (like "0:8GiB") of the fake GPUs once loaded;
    `hint` is its `vram` key."""
    model = {"cmd": upstreams.cmd("--fake-vram", held, "--fake-vram-file", str(gpus), *args, name=name)}
    return {**model, "vram": hint} if hint else model


def vram_config(models: dict, settings: dict | None = None, **top) -> dict:
    vram = {"reserve": "1GiB", **(settings or {})}
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top,
            "routing": {"router": {"use": "vram", "settings": {"vram": vram}}}, "models": models}


async def running_entries(session: aiohttp.ClientSession, ls) -> dict[str, dict]:
    return {entry["model"]: entry for entry in await running(session, ls)}


async def states(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    return {model: entry["state"] for model, entry in (await running_entries(session, ls)).items()}


async def served(session: aiohttp.ClientSession, ls, model: str) -> None:
    status, body = await chat(session, ls, model)
    assert status == 200, body


async def wait_measured(session: aiohttp.ClientSession, ls, model: str, footprint: dict[str, int]) -> None:
    async def shown() -> bool:
        return (await running_entries(session, ls)).get(model, {}).get("vram") == footprint

    assert await eventually(shown, MEASURE_BOUND), (await running_entries(session, ls), ls.output()[-3000:])


def spawned_at(ls, model: str) -> float:
    """Unix time at which llama-swap last spawned `model`'s server (its stamped debug line)."""
    line = next(line for line in reversed(ls.output().splitlines()) if f"<{model}> Executing start command" in line)
    return parse_rfc3339(line.split(" ", 1)[0]).timestamp()


async def data_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of an event stream, as they arrive."""
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: "):]


async def test_models_never_measured_run_alone_then_share_the_gpu_while_they_fit(
        in_process, upstreams, tmp_path, monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    sizes = {"a": 8, "b": 8, "c": 12}
    ls = await in_process(vram_config({m: holder(upstreams, gpus, m, f"0:{size}GiB") for m, size in sizes.items()}))
    async with aiohttp.ClientSession() as s:
        for model, size in sizes.items():
            await served(s, ls, model)
            assert await states(s, ls) == {model: "ready"}, f"{model} never measured must run alone"
            await wait_measured(s, ls, model, {"0": size * GiB})
        await served(s, ls, "a")  # 12 + 8 of 23 GiB: beside c
        assert await states(s, ls) == {"a": "ready", "c": "ready"}
        await served(s, ls, "b")  # 12 + 8 + 8 would not fit: c, used longest ago, goes
        assert await states(s, ls) == {"a": "ready", "b": "ready"}
        await served(s, ls, "a")
        await served(s, ls, "b")
        await served(s, ls, "c")  # room for 12 GiB: a, now the least recently used, goes
        assert await states(s, ls) == {"b": "ready", "c": "ready"}


async def test_vram_hints_let_models_share_the_gpu_from_their_first_load(in_process, upstreams, tmp_path,
                                                                         monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    ls = await in_process(vram_config({m: holder(upstreams, gpus, m, "0:8GiB", hint="8GiB") for m in ("a", "b")}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        assert await states(s, ls) == {"a": "ready", "b": "ready"}


def busy_idle_config(upstreams, gpus: Path, c_size: int) -> dict:
    """a and b (8 GiB each, hinted) and c of `c_size` GiB on a 24 GiB GPU with 1 GiB reserved."""
    return vram_config({"a": holder(upstreams, gpus, "a", "0:8GiB", hint="8GiB"),
                        "b": holder(upstreams, gpus, "b", "0:8GiB", hint="8GiB"),
                        "c": holder(upstreams, gpus, "c", f"0:{c_size}GiB", hint=f"{c_size}GiB")})


def long_stream(chunks: int) -> dict:
    return {"model": "b", "stream": True, "responder_chunks": chunks, "responder_delay": 0.1}


async def test_an_idle_model_makes_room_while_a_busy_one_keeps_streaming(in_process, upstreams, tmp_path,
                                                                         monkeypatch):
    ls = await in_process(busy_idle_config(upstreams, fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0)), c_size=12))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        async with s.post(ls.url + "/v1/chat/completions", json=long_stream(300)) as stream:  # 30 s
            events = data_events(stream)
            await anext(events)
            await asyncio.wait_for(served(s, ls, "c"), START_BOUND)
            entries = await running_entries(s, ls)
            assert {m: e["state"] for m, e in entries.items()} == {"b": "ready", "c": "ready"}
            assert entries["b"]["in_flight"] == 1, "b's stream must still be running"
    assert "vram: model=c needs [0:12.0GiB] evict=[a]" in ls.output()


async def test_a_model_that_needs_a_busy_ones_room_waits_for_its_stream_to_end(
        in_process, upstreams, tmp_path, monkeypatch):
    ls = await in_process(busy_idle_config(upstreams, fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0)), c_size=20))
    chunks = 40  # 4 s
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        async with s.post(ls.url + "/v1/chat/completions", json=long_stream(chunks)) as stream:
            events = data_events(stream)
            received = [await anext(events)]
            wanting = asyncio.create_task(chat(s, ls, "c"))
            received += [await anext(events) for _ in range(15)]
            assert await states(s, ls) == {"a": "ready", "b": "ready"}, "nothing may stop while b streams"
            received += [event async for event in events]
        assert len(received) == chunks + 2 and received[-1] == "[DONE]", "b's stream was cut"
        status, body = await asyncio.wait_for(wanting, START_BOUND)
        assert status == 200, body
        assert await states(s, ls) == {"c": "ready"}


def x_then_y_config(upstreams, gpus: Path, release: int, y_hint: str | None, settings: dict | None = None) -> dict:
    """x (8 GiB, shown freed `release` s after it exits) and y (20 GiB), which needs x's room."""
    return vram_config({"x": holder(upstreams, gpus, "x", "0:8GiB", "--fake-vram-release", str(release), hint="8GiB"),
                        "y": holder(upstreams, gpus, "y", "0:20GiB", hint=y_hint)}, settings, **TIMED_DEBUG_LOG)


async def swap_x_for_y(ls, upstreams, gpus: Path) -> float:
    """Serve x, then y in its place; the moment x's memory was shown free."""
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "x")
        await served(s, ls, "y")
    x_pid = upstreams.pids()[0]
    return fake_processes(gpus)[str(x_pid)]["until"]


@pytest.mark.parametrize("hint", [pytest.param("20GiB", id="hinted"), pytest.param(None, id="never-measured")])
async def test_the_next_model_starts_once_the_evicted_ones_memory_shows_free(
        in_process, upstreams, tmp_path, monkeypatch, hint):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    ls = await in_process(x_then_y_config(upstreams, gpus, 3, hint))
    freed = await swap_x_for_y(ls, upstreams, gpus)
    assert spawned_at(ls, "y") >= freed, "y started while x's memory was still held"
    assert "still not free" not in ls.output()


async def test_release_wait_bounds_the_wait_for_memory(in_process, upstreams, tmp_path, monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 0))
    release = 30
    ls = await in_process(x_then_y_config(upstreams, gpus, release, "20GiB", {"releaseWait": 1}))
    freed = await swap_x_for_y(ls, upstreams, gpus)
    stopped = freed - release  # x wrote `until` just before it exited
    assert stopped + 1 <= spawned_at(ls, "y") < freed
    assert "vram: memory for y still not free after 1s; starting it anyway" in ls.output()


async def test_running_models_and_metrics_show_footprints_and_budgets(in_process, upstreams, tmp_path,
                                                                      monkeypatch):
    gpus = fake_gpus(tmp_path, monkeypatch, (24 * GiB, 2 * GiB), (16 * GiB, 0))
    ls = await in_process(vram_config({"a": holder(upstreams, gpus, "a", "0:6GiB,1:2GiB"),
                                       "b": {"cmd": upstreams.cmd(name="b"), "vram": "6GiB"}},
                                      {"reserve": {0: "1GiB"}}))
    a_vram = {"0": 6 * GiB, "1": 2 * GiB}
    gpu_view = [{"index": 0, "total": 24 * GiB, "used": 8 * GiB, "budget": 24 * GiB - GiB - 2 * GiB},
                {"index": 1, "total": 16 * GiB, "used": 2 * GiB, "budget": 16 * GiB}]
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await wait_measured(s, ls, "a", a_vram)
        async with s.get(ls.url + "/running") as r:
            assert (await r.json())["gpus"] == gpu_view
        async with s.get(ls.url + "/v1/models") as r:
            listing = await r.json()
        async with s.get(ls.url + "/metrics") as r:
            metrics = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert listing["gpus"] == gpu_view
    # b never ran: its hint, split over both GPUs.
    assert {m["id"]: m["meta"]["llamaswap"]["vram"] for m in listing["data"]} == {
        "a": a_vram, "b": {"0": 3 * GiB, "1": 3 * GiB}}
    assert {(x.labels["model"], x.labels["gpu"]): x.value for x in metrics["llamaswap_model_vram_bytes"].samples} == {
        ("a", "0"): 6 * GiB, ("a", "1"): 2 * GiB}
    assert {x.labels["gpu"]: x.value for x in metrics["llamaswap_gpu_vram_budget_bytes"].samples} == {
        "0": 21 * GiB, "1": 16 * GiB}


# -- without a GPU, and on a real one -------------------------------------------------------------

def nvml_gpu_count() -> int:
    """GPUs that NVML (and so llama-swap) can see here; 0 without NVML."""
    nvml = init_nvml()
    if nvml is None:
        return 0
    try:
        return nvml.nvmlDeviceGetCount()
    except nvml.NVMLError:
        return 0
    finally:
        shutdown_nvml(nvml)


async def test_without_a_gpu_every_model_runs_alone(start_llama_swap, upstreams, monkeypatch):
    monkeypatch.delenv("LLAMA_SWAP_FAKE_VRAM", raising=False)
    if nvml_gpu_count():
        pytest.skip("this machine has a GPU that NVML can read")
    ls = start_llama_swap(vram_config({m: {"cmd": upstreams.cmd(name=m), "vram": "1GiB"} for m in ("a", "b")}))
    assert ls.wait_for("vram router: no GPU found")
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "a")
        await served(s, ls, "b")
        assert await states(s, ls) == {"b": "ready"}, "with no GPU known, even hinted models run alone"
        async with s.get(ls.url + "/running") as r:
            assert (await r.json())["gpus"] == []


# Allocates argv[1] bytes on GPU 0 through the CUDA driver API, then runs the script argv[2]
# (the responder) in this same process, so the memory is the model server's own.
GPU_HOLDER = """
import ctypes, runpy, sys
cuda = ctypes.CDLL("libcuda.so.1")
def check(result, call):
    if result != 0:
        sys.exit(f"{call} failed: CUresult {result}")
device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
check(cuda.cuInit(0), "cuInit")
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(int(sys.argv[1]))), "cuMemAlloc")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def nvidia_smi_lists_a_gpu() -> bool:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in listing.splitlines())


async def test_a_real_gpu_process_is_measured_through_nvml(in_process, upstreams, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_SWAP_FAKE_VRAM", raising=False)
    if not (nvidia_smi_lists_a_gpu() and nvml_gpu_count()):
        pytest.skip("needs an NVIDIA GPU listed by nvidia-smi and readable through NVML")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pytest.skip("the CUDA driver library libcuda.so.1 is missing")
    script = tmp_path / "gpu_holder.py"
    script.write_text(GPU_HOLDER)
    allocated = 256 * MiB
    cmd = upstreams.cmd(name="g").replace(f"{PY} {RESPONDER}", f"{PY} {script} {allocated} {RESPONDER}", 1)
    ls = await in_process(vram_config({"g": {"cmd": cmd}}))
    async with aiohttp.ClientSession() as s:
        await served(s, ls, "g")

        async def measured() -> dict[str, int]:
            return (await running_entries(s, ls)).get("g", {}).get("vram", {})

        assert await eventually(measured, MEASURE_BOUND), ls.output()[-3000:]
        assert (await measured()).get("0", 0) >= allocated  # the allocation, plus the CUDA context
        async with s.get(ls.url + "/running") as r:
            first_gpu = (await r.json())["gpus"][0]
    assert first_gpu["index"] == 0 and first_gpu["budget"] <= first_gpu["total"] - GiB
    assert first_gpu["used"] >= allocated
