"""Activity rows, captures, the store across restarts and per-model /metrics, end to end."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import LlamaSwap, chat, eventually, free_port


async def activity(session: aiohttp.ClientSession, ls, query: str = "") -> dict:
    async with session.get(ls.url + "/api/metrics/activity" + query) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def rows_recorded(session: aiohttp.ClientSession, ls, count: int) -> bool:
    return (await activity(session, ls))["total"] >= count


def samples(text: str) -> dict[tuple, float]:
    """Every sample of a Prometheus text page, keyed by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_each_request_gets_an_activity_row_with_its_tokens(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        async with s.post(ls.url + "/v1/chat/completions",
                          json={"model": "m", "stream": True, "responder_chunks": 4}) as r:
            await r.read()
        assert (await chat(s, ls, "m", responder_status=503))[0] == 503
        assert await eventually(lambda: rows_recorded(s, ls, 3), 10)
        rows = (await activity(s, ls, "?order=asc"))["data"]
        async with s.get(ls.url + "/api/metrics/stats") as r:
            stats = await r.json()
    plain, streamed, failed = rows
    assert plain["tokens"]["input_tokens"] == 7 and plain["tokens"]["output_tokens"] == 3
    assert plain["tokens"]["cache_tokens"] == -1 and plain["resp_status_code"] == 200
    assert streamed["resp_content_type"] == "text/event-stream" and streamed["tokens"]["output_tokens"] == 4
    assert failed["resp_status_code"] == 503 and failed["error_msg"] == "503 Service Unavailable"
    assert failed["tokens"]["input_tokens"] == 0
    assert all(r["model"] == "m" and r["req_path"] == "/v1/chat/completions" for r in rows)
    loaded = {"fifo_priority": "0", "swap_id": "1", "swap_stopped": ""}  # the request that started m says so
    assert {k: v for k, v in plain["metadata"].items() if k != "swap_seconds"} == loaded
    assert float(plain["metadata"]["swap_seconds"]) > 0 and streamed["metadata"] == {"fifo_priority": "0"}
    assert stats["total_requests"] == 3 and stats["total_output_tokens"] == 7


async def test_a_capture_round_trips_a_request_and_its_streamed_answer(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "captureBuffer": 5,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    request = {"model": "m", "stream": True, "responder_chunks": 3, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json=request, headers={"Authorization": "Bearer k"}) as r:
            streamed = await r.read()
        assert await eventually(lambda: rows_recorded(s, ls, 1), 10)
        [row] = (await activity(s, ls))["data"]
        assert row["has_capture"] is True
        async with s.get(ls.url + f"/api/captures/{row['id']}") as r:
            capture = await r.json()
        async with s.get(ls.url + "/api/captures/999") as r:
            assert r.status == 404 and (await r.json())["error"]["message"] == "capture not found"
    assert json.loads(base64.b64decode(capture["req_body"])) == request
    assert base64.b64decode(capture["resp_body"]) == streamed
    assert capture["req_headers"]["Authorization"] == "[REDACTED]"
    assert capture["resp_headers"]["Content-Type"] == "text/event-stream"
    assert capture["req_path"] == "/v1/chat/completions"


async def test_without_a_capture_buffer_nothing_is_captured(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "captureBuffer": 0,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        assert await eventually(lambda: rows_recorded(s, ls, 1), 10)
        [row] = (await activity(s, ls))["data"]
        assert row["has_capture"] is False


async def test_activity_survives_a_restart_with_a_store_path(tmp_path, upstreams):
    config = {"healthCheckTimeout": 15, "store": {"path": str(tmp_path / "activity.db")},
              "models": {"m": {"cmd": upstreams.cmd(name="m")}}}
    for expected in (1, 2):
        ls = LlamaSwap(tmp_path, config)
        try:
            async with aiohttp.ClientSession() as s:
                assert (await chat(s, ls, "m"))[0] == 200
                assert await eventually(lambda: rows_recorded(s, ls, expected), 10)
                rows = (await activity(s, ls, "?order=asc"))["data"]
        finally:
            assert ls.stop() == 0, ls.output()
        assert [r["id"] for r in rows] == list(range(1, expected + 1))


async def test_the_in_memory_store_keeps_the_newest_metrics_max_in_memory_rows(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "metricsMaxInMemory": 2,
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            assert (await chat(s, ls, "m"))[0] == 200

        async def four_recorded() -> bool:
            return [r["id"] for r in (await activity(s, ls))["data"]] == [4, 3]
        assert await eventually(four_recorded, 10)


async def test_an_unusable_store_path_is_a_clear_startup_error(tmp_path):
    bad = tmp_path / "not-a-database"
    bad.write_bytes(b"this is not sqlite" * 100)
    config = {"store": {"path": str(bad)}, "models": {"m": {"cmd": "unused --port ${PORT}"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "llama_swap", "--config", str(tmp_path / "c.yaml"),
                           "--listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"store.path: cannot open {bad}" in done.stderr and "Traceback" not in done.stderr


async def test_metrics_show_per_model_series_after_a_swap(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {
        "a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b"), "concurrencyLimit": 1}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        assert (await chat(s, ls, "b"))[0] == 200  # stops a: a swap
        assert (await chat(s, ls, "nope"))[0] == 404  # no model: not a model's request
        assert await eventually(lambda: rows_recorded(s, ls, 2), 10)
        async with s.get(ls.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            page = samples(await r.text())
    m = lambda name, **labels: page.get((name, tuple(sorted(labels.items()))))  # noqa: E731
    assert m("llamaswap_model_starts_total", model="a", result="ready") == 1
    assert m("llamaswap_model_starts_total", model="b", result="ready") == 1
    assert m("llamaswap_model_stops_total", model="a", reason="swap") == 1
    assert m("llamaswap_requests_total", model="a", path="/v1/chat/completions", status="200") == 1
    assert (m("llamaswap_model_state", model="b", state="ready") == 1
            and m("llamaswap_model_state", model="a", state="stopped") == 1)
    assert m("llamaswap_tokens_total", model="a", kind="prompt") == 7
    assert m("llamaswap_tokens_total", model="b", kind="generated") == 3
    assert m("llamaswap_request_duration_seconds_count", model="a") == 1
    assert m("llamaswap_queue_wait_seconds_count", model="b") == 1
    assert m("llamaswap_model_start_duration_seconds_count", model="b") == 1
    assert m("llamaswap_queue_depth", model="a") == 0 and m("llamaswap_inflight_requests", model="b") == 0


async def test_metrics_count_refusals_and_unloads(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15,
                           "models": {"m": {"cmd": upstreams.cmd(name="m"), "concurrencyLimit": 1}}})
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(chat(s, ls, "m", responder_sleep=2))

        async def admitted() -> bool:
            async with s.get(ls.url + "/api/inflight") as r:
                return bool((await r.json())["requests"])
        assert await eventually(admitted, 10)
        assert (await chat(s, ls, "m"))[0] == 429
        assert (await slow)[0] == 200
        async with s.post(ls.url + "/api/models/unload") as r:
            assert r.status == 200
        async with s.get(ls.url + "/metrics") as r:
            page = samples(await r.text())
    assert page[("llamaswap_requests_refused_total", (("model", "m"),))] >= 1
    assert page[("llamaswap_model_stops_total", (("model", "m"), ("reason", "unload")))] == 1
    assert page[("llamaswap_requests_total",
                 (("model", "m"), ("path", "/v1/chat/completions"), ("status", "429")))] >= 1


async def test_system_samples_hardware_and_a_disabled_monitor(in_process, upstreams):
    ls = await in_process({"performance": {"disabled": True}, "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/api/performance") as r:
            assert r.status == 503 and await r.json() == {"enabled": False}
        async with s.get(ls.url + "/metrics") as r:  # our per-model series stay
            assert r.status == 200
            page = samples(await r.text())
        async with s.get(ls.url + "/api/hardware") as r:
            assert r.status == 200
            hardware = await r.json()
    assert page[("llamaswap_model_state", (("model", "m"), ("state", "stopped")))] == 1
    assert not any(name.startswith("llamaswap_cpu_") for name, _ in page)
    assert hardware["schema_version"] == 1 and hardware["memory"]["capacity_bytes"] > 0
    assert isinstance(hardware["accelerators"], list)


async def test_performance_rejects_a_bad_after_and_lists_nothing_before_the_first_sample(in_process, upstreams):
    ls = await in_process({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/api/performance?after=yesterday") as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "invalid 'after' timestamp, use RFC3339 format"
        async with s.get(ls.url + "/api/performance?after=2000-01-01T00:00:00Z") as r:
            assert r.status == 200 and (await r.json())["enabled"] is True


async def test_a_metered_request_asks_only_for_encodings_we_can_read(in_process, upstreams):
    ls = await in_process({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "m"},
                          headers={"Accept-Encoding": "br, gzip;q=0.8, zstd, deflate"}) as r:
            metered = (await r.json())["echo"]["headers"]
        async with s.post(ls.url + "/upstream/m/slots", json={}, headers={"Accept-Encoding": "br, gzip"}) as r:
            passthrough = (await r.json())["echo"]["headers"]
    assert metered["Accept-Encoding"] == "gzip;q=0.8, deflate"
    assert passthrough["Accept-Encoding"] == "br, gzip"  # not a model route: untouched


async def test_a_failed_start_is_shown_with_its_reason_until_the_next_attempt(in_process, upstreams, tmp_path):
    flag = tmp_path / "broken"
    flag.write_text("yes")
    cmd = f"sh -c 'test -e {flag} && {{ echo cannot open model file; exit 3; }}; exec {upstreams.cmd(name='m')}'"
    ls = await in_process({"healthCheckTimeout": 15, "models": {"m": {"cmd": cmd}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 500
        async with s.get(ls.url + "/v1/models") as r:
            status = (await r.json())["data"][0]["status"]
        assert status["value"] == "unloaded" and "exited prematurely with exit status 3" in status["error"]
        assert "cannot open model file" in status["error"]
        async with s.get(ls.url + "/running") as r:
            running = await r.json()
        assert running["running"] == [] and running["failed"][0]["model"] == "m"
        assert "cannot open model file" in running["failed"][0]["error"] and running["failed"][0]["at"]
        assert ls.runtime.processes["m"].failure is not None
        flag.unlink()
        assert (await chat(s, ls, "m"))[0] == 200, "the next attempt"
        async with s.get(ls.url + "/v1/models") as r:
            assert (await r.json())["data"][0]["status"] == {"value": "loaded"}
        async with s.get(ls.url + "/running") as r:
            assert "failed" not in await r.json()
