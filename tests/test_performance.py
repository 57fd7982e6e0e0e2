"""The performance monitor, /api/performance, Prometheus text and /api/hardware."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import types
from types import SimpleNamespace
from typing import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families

import llama_swap as perf
from llama_swap import (
    MIB,
    GpuStat,
    HistogramSeries,
    NetIOStat,
    PerformanceMonitor,
    SysStat,
    cpu_percent_per_core,
    escape_label_value,
    format_number,
    hardware_snapshot,
    histogram_family,
    metric_family,
    open_nvml,
    parse_cpu_times,
    parse_loadavg,
    parse_meminfo,
    parse_net_dev,
    parse_rfc3339,
    read_system_stats,
    render_prometheus,
    sample_json,
)
from llama_swap import go_time as rfc3339


class FakeGpuProvider:
    """Answers every sample with the stats it was given; for tests."""

    def __init__(self, stats: Iterable[GpuStat] = ()):
        self.stats = list(stats)
        self.closed = False

    def sample(self) -> list[GpuStat]:
        return list(self.stats)

    def close(self) -> None:
        self.closed = True


UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


# /proc parsing ###############################################################

PROC_STAT_1 = """\
cpu  300 0 100 1600 0 0 0 0 0 0
cpu0 100 0 50 800 0 0 0 0 0 0
cpu1 200 0 50 800 0 0 0 0 0 0
intr 3281336 0 0
ctxt 3372101
"""
# cpu0: +30 busy of +100 total; cpu1: +0 busy (idle only); iowait counts as idle.
PROC_STAT_2 = """\
cpu  330 0 100 1730 20 0 0 0 0 0
cpu0 120 0 55 870 0 0 5 0 0 0
cpu1 200 0 50 860 20 0 0 0 0 0
"""


def test_cpu_times_are_per_core_busy_and_total_jiffies():
    assert parse_cpu_times(PROC_STAT_1) == {"cpu0": (150, 950), "cpu1": (250, 1050)}


def test_guest_time_is_not_counted_twice():
    # guest (field 9) is already part of user (field 1)
    assert parse_cpu_times("cpu0 100 0 0 100 0 0 0 0 40 0\n") == {"cpu0": (100, 200)}


def test_cpu_percent_is_the_busy_share_between_two_samples():
    before, after = parse_cpu_times(PROC_STAT_1), parse_cpu_times(PROC_STAT_2)
    assert cpu_percent_per_core(before, after) == [30.0, 0.0]


def test_first_cpu_sample_is_the_average_since_boot():
    assert cpu_percent_per_core(None, parse_cpu_times(PROC_STAT_1)) == pytest.approx([150 / 950 * 100,
                                                                                      250 / 1050 * 100])


def test_cpu_percent_never_exceeds_100_or_goes_negative():
    assert cpu_percent_per_core({"cpu0": (10, 10)}, {"cpu0": (30, 20)}) == [100.0]
    assert cpu_percent_per_core({"cpu0": (50, 100)}, {"cpu0": (40, 200)}) == [0.0]


MEMINFO = """\
MemTotal:       16384000 kB
MemFree:         2048000 kB
MemAvailable:    8192000 kB
Buffers:          100000 kB
Cached:          4000000 kB
SwapCached:            0 kB
SwapTotal:       4096000 kB
SwapFree:        3072000 kB
HugePages_Total:       0
"""


def test_memory_used_is_total_minus_available_and_free_is_memfree():
    fields = perf.memory_fields(parse_meminfo(MEMINFO))
    assert fields == {"mem_total_mb": 16000, "mem_used_mb": 8000, "mem_free_mb": 2000,
                      "swap_total_mb": 4000, "swap_used_mb": 1000}


def test_memory_used_without_memavailable_subtracts_free_buffers_and_cache():
    old_kernel = "\n".join(line for line in MEMINFO.splitlines() if not line.startswith("MemAvailable"))
    assert (perf.memory_fields(parse_meminfo(old_kernel))["mem_used_mb"]
            == (16384000 - 2048000 - 100000 - 4000000) // 1024)


def test_load_average_reads_three_numbers_and_zeros_on_garbage():
    assert parse_loadavg("0.21 0.44 0.50 1/83 1243\n") == (0.21, 0.44, 0.5)
    assert parse_loadavg("") == (0.0, 0.0, 0.0)
    assert parse_loadavg("x y z") == (0.0, 0.0, 0.0)


NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|\
bytes    packets errs drop fifo colls carrier compressed
    lo: 1258310523  836975    0    0    0     0          0         0 \
1258310523  836975    0    0    0     0       0          0
  eth0: 62714548    1782    0    0    0     0          0         0 \
  149060    1275    0    0    0     0       0          0
wlan0:123456789012 10 0 0 0 0 0 0 987654321 20 0 0 0 0 0 0
"""


def test_network_counters_leave_out_loopback():
    assert parse_net_dev(NET_DEV) == [NetIOStat("eth0", 62714548, 149060), NetIOStat("wlan0", 123456789012, 987654321)]


def test_system_stats_on_this_machine():
    first, cpu_times = read_system_stats(None)
    second, _ = read_system_stats(cpu_times)
    assert len(second.cpu_util_per_core) == len(cpu_times) > 0
    assert all(0 <= pct <= 100 for pct in second.cpu_util_per_core)
    assert second.mem_total_mb > 0 and second.mem_used_mb <= second.mem_total_mb
    assert "lo" not in [io.name for io in second.net_io]
    assert second.timestamp.tzinfo is not None and second.timestamp >= first.timestamp


def test_system_stats_without_proc_are_zeros_not_an_error(monkeypatch):
    monkeypatch.setattr(perf, "read_text", lambda path: "")
    monkeypatch.delattr(os, "getloadavg")
    stat, cpu_times = read_system_stats(None)
    assert cpu_times == {}
    assert (stat.cpu_util_per_core, stat.net_io, stat.mem_total_mb, stat.load_avg_1) == ((), (), 0, 0.0)


# JSON and timestamps ##########################################################

def test_sys_stat_json_has_the_spec_fields_in_order():
    stat = SysStat(at(0), (10.5, 20.0), 8192, 4096, 1024, 2048, 0, 1.5, 1.0, 0.25, (NetIOStat("eth0", 1000, 2000),))
    assert sample_json(stat) == {
        "timestamp": "2026-03-01T12:00:00Z", "cpu_util_per_core": [10.5, 20], "mem_total_mb": 8192,
        "mem_used_mb": 4096, "mem_free_mb": 1024, "swap_total_mb": 2048, "swap_used_mb": 0, "load_avg_1": 1.5,
        "load_avg_5": 1, "load_avg_15": 0.25, "net_io": [{"name": "eth0", "bytes_recv": 1000, "bytes_sent": 2000}]}
    assert json.dumps(sample_json(stat)["cpu_util_per_core"]) == "[10.5, 20]"  # Go writes 20, not 20.0


def test_gpu_stat_json_has_the_spec_fields_in_order():
    keys = list(sample_json(GpuStat(at(0), 0, "gpu")))
    assert keys == ["timestamp", "id", "name", "uuid", "temp_c", "vram_temp_c", "gpu_util_pct", "mem_util_pct",
                    "mem_used_mb", "mem_total_mb", "fan_speed_pct", "power_draw_w"]


def test_timestamps_are_rfc3339_with_zone_and_trimmed_fraction():
    assert rfc3339(datetime.datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)) == "2026-03-01T12:00:00.5Z"
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert (rfc3339(datetime.datetime(2026, 3, 1, 14, 0, 0, 123456, tzinfo=plus_two))
            == "2026-03-01T14:00:00.123456+02:00")
    minus = datetime.timezone(-datetime.timedelta(hours=5, minutes=30))
    assert rfc3339(datetime.datetime(2026, 3, 1, 6, 30, tzinfo=minus)) == "2026-03-01T06:30:00-05:30"


def test_local_sample_times_carry_the_local_offset():
    stamp = rfc3339(perf.local_now())
    assert stamp.endswith("Z") or stamp[-6] in "+-"


def test_after_parses_like_go_rfc3339():
    assert parse_rfc3339("2026-03-01T12:00:00Z") == T0
    assert parse_rfc3339("2026-03-01T14:00:00.5+02:00") == at(0.5)
    assert parse_rfc3339("2026-03-01T12:00:00.123456789Z") == at(0.123456)


@pytest.mark.parametrize("text", ["2026-03-01", "2026-03-01T12:00:00", "2026-03-01t12:00:00z", "2026-03-01 12:00:00Z",
                                  "2026-13-01T12:00:00Z", "2026-03-01T24:00:00Z", "2026-03-01T12:00:00+24:00",
                                  "2026-03-01T12:00:00+01:60", "yesterday", ""])
def test_after_that_is_not_rfc3339_is_rejected(text):
    with pytest.raises(ValueError):
        parse_rfc3339(text)


# Monitor ######################################################################

def sys_at(seconds: float) -> SysStat:
    return SysStat(at(seconds), (1.0,), 100, 50, 50)


def gpu_at(seconds: float, gpu_id: int = 0, temp: int = 50) -> GpuStat:
    return GpuStat(at(seconds), gpu_id, f"gpu{gpu_id}", temp_c=temp)


def test_empty_history_lists_are_null_without_a_filter_and_empty_with_one():
    monitor = PerformanceMonitor(5)
    assert monitor.snapshot() == {"enabled": True, "gpu_stats": None, "sys_stats": None}
    assert monitor.snapshot(at(0)) == {"enabled": True, "gpu_stats": [], "sys_stats": []}


def test_no_gpu_samples_is_null_while_system_samples_are_listed():
    monitor = PerformanceMonitor(5)
    monitor.record(sys_at(0), [])
    body = monitor.snapshot()
    assert body["gpu_stats"] is None and [s["timestamp"] for s in body["sys_stats"]] == ["2026-03-01T12:00:00Z"]


def test_after_keeps_only_samples_strictly_later():
    monitor = PerformanceMonitor(5)
    for seconds in (0, 5, 10):
        monitor.record(sys_at(seconds), [gpu_at(seconds, 0), gpu_at(seconds, 1)])
    body = monitor.snapshot(at(5))
    assert [s["timestamp"] for s in body["sys_stats"]] == ["2026-03-01T12:00:10Z"]
    assert [(g["id"], g["timestamp"]) for g in body["gpu_stats"]] == [(0, "2026-03-01T12:00:10Z"),
                                                                      (1, "2026-03-01T12:00:10Z")]
    assert len(monitor.snapshot()["gpu_stats"]) == 6
    assert monitor.snapshot(at(10)) == {"enabled": True, "gpu_stats": [], "sys_stats": []}


@pytest.mark.parametrize(("every", "length"), [(5, 720), (7, 514), (60, 60), (5000, 1)])
def test_ring_holds_one_hour_of_samples(every, length):
    monitor = PerformanceMonitor(every, FakeGpuProvider())
    for tick in range(length + 10):
        monitor.record(sys_at(tick * every), [gpu_at(tick * every, 0), gpu_at(tick * every, 1)])
    assert len(monitor.sys_samples) == len(monitor.gpu_samples) == length
    assert monitor.sys_samples[0].timestamp == at(10 * every)  # the oldest ten were dropped


def test_latest_is_the_newest_system_sample_and_newest_reading_per_gpu():
    monitor = PerformanceMonitor(5)
    assert monitor.latest() == (None, [])
    monitor.record(sys_at(0), [gpu_at(0, 1, temp=40), gpu_at(0, 0, temp=41)])
    monitor.record(sys_at(5), [gpu_at(5, 0, temp=60)])
    sys_stat, gpus = monitor.latest()
    assert sys_stat.timestamp == at(5)
    assert [(g.id, g.temp_c) for g in gpus] == [(0, 60), (1, 40)]


def test_run_samples_every_interval_in_threads_until_cancelled():
    provider = FakeGpuProvider([gpu_at(0)])
    monitor = PerformanceMonitor(0.02, provider)

    async def sample_a_while():
        task = asyncio.create_task(monitor.run())
        ticks = 0
        while len(monitor.sys_samples) < 3:  # the loop stays responsive while the monitor samples
            await asyncio.sleep(0.005)
            ticks += 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ticks

    assert asyncio.run(asyncio.wait_for(sample_a_while(), 5)) >= 3
    assert len(monitor.gpu_samples) >= 3
    assert not provider.closed  # the provider belongs to whoever made it


# Prometheus ###################################################################

EXAMPLE_SYS = SysStat(at(0), (10.5, 20.0), mem_total_mb=8192, mem_used_mb=4096, mem_free_mb=2048,
                      swap_total_mb=1024, swap_used_mb=0, load_avg_1=1.5, load_avg_5=1.0, load_avg_15=0.75,
                      net_io=(NetIOStat("eth0", 1000, 2000),))
GPU_WITH_UUID = GpuStat(at(0), 0, "NVIDIA RTX 4090", "GPU-1234", temp_c=75, vram_temp_c=0, gpu_util_pct=99.5,
                        mem_util_pct=50.0, mem_used_mb=12288, mem_total_mb=24576, fan_speed_pct=30.0,
                        power_draw_w=448.69)
GPU_WITHOUT_UUID = GpuStat(at(0), 1, "Radeon", "", temp_c=60, vram_temp_c=70, gpu_util_pct=0.0, mem_util_pct=0.0,
                           mem_used_mb=0, mem_total_mb=16384, fan_speed_pct=0.0, power_draw_w=12.0)

EXPECTED_METRICS = """\
# HELP llamaswap_cpu_util_percent CPU utilization per core (0-100)
# TYPE llamaswap_cpu_util_percent gauge
llamaswap_cpu_util_percent{core="0"} 10.5
llamaswap_cpu_util_percent{core="1"} 20
# HELP llamaswap_memory_total_bytes Total memory in bytes
# TYPE llamaswap_memory_total_bytes gauge
llamaswap_memory_total_bytes 8589934592
# HELP llamaswap_memory_used_bytes Used memory in bytes
# TYPE llamaswap_memory_used_bytes gauge
llamaswap_memory_used_bytes 4294967296
# HELP llamaswap_memory_free_bytes Free memory in bytes
# TYPE llamaswap_memory_free_bytes gauge
llamaswap_memory_free_bytes 2147483648
# HELP llamaswap_swap_total_bytes Total swap in bytes
# TYPE llamaswap_swap_total_bytes gauge
llamaswap_swap_total_bytes 1073741824
# HELP llamaswap_swap_used_bytes Used swap in bytes
# TYPE llamaswap_swap_used_bytes gauge
llamaswap_swap_used_bytes 0
# HELP llamaswap_load_average Load average
# TYPE llamaswap_load_average gauge
llamaswap_load_average{interval="1m"} 1.5
llamaswap_load_average{interval="5m"} 1
llamaswap_load_average{interval="15m"} 0.75
# HELP llamaswap_network_bytes_total Total network bytes transferred
# TYPE llamaswap_network_bytes_total counter
llamaswap_network_bytes_total{interface="eth0",direction="recv"} 1000
llamaswap_network_bytes_total{interface="eth0",direction="sent"} 2000
# HELP llamaswap_gpu_temperature_celsius GPU temperature in Celsius
# TYPE llamaswap_gpu_temperature_celsius gauge
llamaswap_gpu_temperature_celsius{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 75
llamaswap_gpu_temperature_celsius{id="1",name="Radeon"} 60
# HELP llamaswap_gpu_vram_temperature_celsius GPU VRAM temperature in Celsius
# TYPE llamaswap_gpu_vram_temperature_celsius gauge
llamaswap_gpu_vram_temperature_celsius{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 0
llamaswap_gpu_vram_temperature_celsius{id="1",name="Radeon"} 70
# HELP llamaswap_gpu_util_percent GPU utilization percent (0-100)
# TYPE llamaswap_gpu_util_percent gauge
llamaswap_gpu_util_percent{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 99.5
llamaswap_gpu_util_percent{id="1",name="Radeon"} 0
# HELP llamaswap_gpu_memory_util_percent GPU memory utilization percent (0-100)
# TYPE llamaswap_gpu_memory_util_percent gauge
llamaswap_gpu_memory_util_percent{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 50
llamaswap_gpu_memory_util_percent{id="1",name="Radeon"} 0
# HELP llamaswap_gpu_memory_used_bytes GPU memory used in bytes
# TYPE llamaswap_gpu_memory_used_bytes gauge
llamaswap_gpu_memory_used_bytes{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 1.2884901888e+10
llamaswap_gpu_memory_used_bytes{id="1",name="Radeon"} 0
# HELP llamaswap_gpu_memory_total_bytes GPU memory total in bytes
# TYPE llamaswap_gpu_memory_total_bytes gauge
llamaswap_gpu_memory_total_bytes{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 2.5769803776e+10
llamaswap_gpu_memory_total_bytes{id="1",name="Radeon"} 1.7179869184e+10
# HELP llamaswap_gpu_fan_speed_percent GPU fan speed percent (0-100)
# TYPE llamaswap_gpu_fan_speed_percent gauge
llamaswap_gpu_fan_speed_percent{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 30
llamaswap_gpu_fan_speed_percent{id="1",name="Radeon"} 0
# HELP llamaswap_gpu_power_draw_watts GPU power draw in watts
# TYPE llamaswap_gpu_power_draw_watts gauge
llamaswap_gpu_power_draw_watts{id="0",name="NVIDIA RTX 4090",uuid="GPU-1234"} 448.69
llamaswap_gpu_power_draw_watts{id="1",name="Radeon"} 12
"""


def test_metrics_text_matches_go_line_by_line():
    text = render_prometheus(EXAMPLE_SYS, [GPU_WITHOUT_UUID, GPU_WITH_UUID])  # sorted by id on output
    assert text.splitlines() == EXPECTED_METRICS.splitlines()
    assert text.endswith("\n")


def test_metrics_text_is_valid_prometheus_exposition():
    families = {f.name: f
                for f in text_string_to_metric_families(render_prometheus(EXAMPLE_SYS,
                                                                          [GPU_WITH_UUID, GPU_WITHOUT_UUID]))}
    assert families["llamaswap_network_bytes"].type == "counter"  # the parser drops the _total suffix
    assert families["llamaswap_cpu_util_percent"].type == "gauge"
    assert families["llamaswap_memory_total_bytes"].samples[0].value == 8589934592
    used = {s.labels["id"]: (s.labels.get("uuid"), s.value)
            for s in families["llamaswap_gpu_memory_used_bytes"].samples}
    assert used == {"0": ("GPU-1234", 12288 * MIB), "1": (None, 0)}
    assert len(families) == 8 + 8


def test_nothing_is_written_before_the_first_sample():
    assert render_prometheus(None, []) == ""


def test_gpu_families_alone_when_only_gpu_samples_exist():
    assert render_prometheus(None, [GPU_WITH_UUID]).startswith("# HELP llamaswap_gpu_temperature_celsius")


def test_no_network_family_without_interfaces_and_no_gpu_families_without_gpus():
    text = render_prometheus(SysStat(at(0)), [])
    assert "llamaswap_network_bytes_total" not in text and "llamaswap_gpu" not in text
    assert "# TYPE llamaswap_cpu_util_percent gauge\n# HELP llamaswap_memory_total_bytes" in text


def test_metrics_use_the_newest_reading_of_each_gpu():
    old, new = gpu_at(0, 0, temp=40), gpu_at(5, 0, temp=80)
    assert 'llamaswap_gpu_temperature_celsius{id="0",name="gpu0"} 80\n' in render_prometheus(None, [new, old])


def test_label_values_escape_quote_backslash_and_newline():
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    odd = GpuStat(at(0), 0, 'Card "X"\\2\nrev', 'GPU-"1"')
    text = render_prometheus(None, [odd])
    assert 'llamaswap_gpu_temperature_celsius{id="0",name="Card \\"X\\"\\\\2\\nrev",uuid="GPU-\\"1\\""} 0\n' in text
    sample = next(text_string_to_metric_families(text)).samples[0]
    assert sample.labels == {"id": "0", "name": 'Card "X"\\2\nrev', "uuid": 'GPU-"1"'}


def test_interface_names_are_escaped_too():
    stat = SysStat(at(0), net_io=(NetIOStat('we"ird', 1, 2),))
    assert 'llamaswap_network_bytes_total{interface="we\\"ird",direction="recv"} 1\n' in render_prometheus(stat, [])


@pytest.mark.parametrize(("value", "text"), [
    (20.0, "20"), (10.5, "10.5"), (8589934592, "8589934592"), (8589934592.0, "8.589934592e+09"),
    (0, "0"), (0.0, "0"), (-0.0, "-0"), (-2.5, "-2.5"), (100.0, "100"), (123456.0, "123456"),
    (999999.0, "999999"), (1e6, "1e+06"), (1234567.0, "1.234567e+06"), (448.69, "448.69"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (0.000123, "0.000123"), (1.5e-7, "1.5e-07"),
    (0.1 + 0.2, "0.30000000000000004"), (1e21, "1e+21"), (1e100, "1e+100"), (3.4190917632e10, "3.4190917632e+10"),
    (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
])
def test_numbers_are_formatted_as_go_percent_g(value, text):
    assert format_number(value) == text


def test_metric_family_for_reuse_with_and_without_labels():
    text = metric_family("llamaswap_requests_total", "Requests\nby model \\ status", "counter",
                         [({"model": "qwen", "status": "200"}, 3), ({"model": "llama", "status": "500"}, 1)])
    assert text.splitlines() == [
        "# HELP llamaswap_requests_total Requests\\nby model \\\\ status",
        "# TYPE llamaswap_requests_total counter",
        'llamaswap_requests_total{model="qwen",status="200"} 3',
        'llamaswap_requests_total{model="llama",status="500"} 1',
    ]
    assert metric_family("up", "Up", "gauge", [({}, 1.0)]) == "# HELP up Up\n# TYPE up gauge\nup 1\n"
    family = next(text_string_to_metric_families(text))
    assert family.documentation == "Requests\nby model \\ status"


def test_histogram_family_writes_buckets_then_inf_sum_and_count():
    series = [HistogramSeries({"model": "qwen"}, [1, 3, 4], 7.25, 5),
              HistogramSeries({"model": "llama"}, [0, 0, 2], 9.0, 2)]
    text = histogram_family("llamaswap_request_seconds", "Request duration", [0.5, 1, 2.5], series)
    assert text.splitlines() == [
        "# HELP llamaswap_request_seconds Request duration",
        "# TYPE llamaswap_request_seconds histogram",
        'llamaswap_request_seconds_bucket{model="qwen",le="0.5"} 1',
        'llamaswap_request_seconds_bucket{model="qwen",le="1"} 3',
        'llamaswap_request_seconds_bucket{model="qwen",le="2.5"} 4',
        'llamaswap_request_seconds_bucket{model="qwen",le="+Inf"} 5',
        'llamaswap_request_seconds_sum{model="qwen"} 7.25',
        'llamaswap_request_seconds_count{model="qwen"} 5',
        'llamaswap_request_seconds_bucket{model="llama",le="0.5"} 0',
        'llamaswap_request_seconds_bucket{model="llama",le="1"} 0',
        'llamaswap_request_seconds_bucket{model="llama",le="2.5"} 2',
        'llamaswap_request_seconds_bucket{model="llama",le="+Inf"} 2',
        'llamaswap_request_seconds_sum{model="llama"} 9',
        'llamaswap_request_seconds_count{model="llama"} 2',
    ]
    family = next(text_string_to_metric_families(text))
    assert family.type == "histogram" and len(family.samples) == 12
    unlabelled = histogram_family("wait_seconds", "Wait", [1], [HistogramSeries({}, [2], 0.5, 3)])
    assert 'wait_seconds_bucket{le="+Inf"} 3\nwait_seconds_sum 0.5\nwait_seconds_count 3\n' in unlabelled


def test_histogram_counts_must_match_the_buckets():
    with pytest.raises(ValueError, match="2 bucket counts for 3 buckets"):
        histogram_family("h", "H", [1, 2, 3], [HistogramSeries({}, [1, 2], 1.0, 2)])


# GPUs #########################################################################

def test_the_gpu_source_matches_the_machine():
    """Real NVML where the machine has an NVIDIA GPU (the device node is there); none elsewhere."""
    provider = open_nvml()
    if not os.path.exists("/dev/nvidiactl"):
        assert provider is None
        return
    try:
        stats = provider.sample()
        assert stats and all(s.name and s.mem_total_mb > 0 and 0 <= s.mem_used_mb <= s.mem_total_mb for s in stats)
        assert [s.id for s in stats] == sorted(s.id for s in stats)
    finally:
        provider.close()


def test_no_gpu_source_without_the_nvml_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert open_nvml() is None
    assert perf.nvml_accelerators() == []


class FakeNVMLError(Exception):
    pass


def not_supported(*args):
    raise FakeNVMLError("Not Supported")


def fake_nvml(device_count: int = 2) -> types.ModuleType:
    """A stand-in for pynvml: GPU 0 is a data-centre board (HBM temperature, no fan), GPU 1 a
    desktop card (fan, no memory temperature, no power reading)."""
    nvml = types.ModuleType("pynvml")
    nvml.calls = []
    nvml.NVMLError = FakeNVMLError
    nvml.NVML_SUCCESS, nvml.NVML_TEMPERATURE_GPU, nvml.NVML_FI_DEV_MEMORY_TEMP = 0, 0, 82
    nvml.nvmlInit = lambda: nvml.calls.append("init")
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: device_count
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetName = lambda handle: {"gpu0": "NVIDIA H100 80GB HBM3", "gpu1": "NVIDIA GeForce RTX 4090"}[handle]
    nvml.nvmlDeviceGetUUID = lambda handle: "GPU-" + handle
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: {"gpu0": 45, "gpu1": 61}[handle]
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: SimpleNamespace(gpu=87, memory=12)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(used=20480 * MIB + 5, total=81920 * MIB)
    nvml.nvmlDeviceGetFanSpeed = lambda handle: not_supported() if handle == "gpu0" else 35
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 312500 if handle == "gpu0" else not_supported()
    nvml.nvmlDeviceGetFieldValues = lambda handle, ids: [SimpleNamespace(
        nvmlReturn=0 if handle == "gpu0" else 3, valueType=1, value=SimpleNamespace(uiVal=52))]
    nvml.nvmlSystemGetDriverVersion = lambda: "570.86.15"
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda handle: 700000 if handle == "gpu0" else not_supported()
    nvml.nvmlDeviceGetArchitecture = lambda handle: {"gpu0": 9, "gpu1": 8}[handle]
    return nvml


def test_nvml_readings_with_unsupported_fields_read_zero(monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    provider = open_nvml()
    board, card = provider.sample()
    assert board == GpuStat(board.timestamp, 0, "NVIDIA H100 80GB HBM3", "GPU-gpu0", temp_c=45, vram_temp_c=52,
                            gpu_util_pct=87.0, mem_util_pct=25.0, mem_used_mb=20480, mem_total_mb=81920,
                            fan_speed_pct=0.0, power_draw_w=312.5)
    assert ((card.name, card.vram_temp_c, card.fan_speed_pct, card.power_draw_w)
            == ("NVIDIA GeForce RTX 4090", 0, 35.0, 0))
    assert board.timestamp == card.timestamp and board.timestamp.tzinfo is not None
    provider.close()
    provider.close()
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_without_gpus_is_no_source(monkeypatch):
    nvml = fake_nvml(device_count=0)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert open_nvml() is None
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_that_fails_to_start_is_no_source(monkeypatch):
    nvml = fake_nvml()
    nvml.nvmlInit = not_supported
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert open_nvml() is None


def test_nvml_accelerators_for_the_hardware_snapshot(monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert perf.nvml_accelerators() == [
        {"index": 0, "kind": "gpu", "vendor": "NVIDIA", "model": "NVIDIA H100 80GB HBM3", "architecture": "Hopper",
         "memory": {"kind": "dedicated", "capacity_bytes": 81920 * MIB},
         "driver": {"name": "NVIDIA", "version": "570.86.15"}, "power_limit_watts": 700},
        {"index": 1, "kind": "gpu", "vendor": "NVIDIA", "model": "NVIDIA GeForce RTX 4090",
         "architecture": "Ada Lovelace",
         "memory": {"kind": "dedicated", "capacity_bytes": 81920 * MIB},
         "driver": {"name": "NVIDIA", "version": "570.86.15"}, "power_limit_watts": None},
    ]
    assert nvml.calls == ["init", "shutdown"]


# Hardware #####################################################################

def test_hardware_snapshot_has_the_schema_v1_keys_on_this_machine():
    snapshot = hardware_snapshot("0.1.0")
    assert list(snapshot) == ["schema_version", "captured_at", "capture", "architecture", "operating_system",
                              "environment", "cpu", "memory", "accelerators"]
    assert snapshot["schema_version"] == 1 and snapshot["captured_at"].endswith("Z")
    assert snapshot["capture"] == {"scope": "inference_host", "method": "detected",
                                   "detector": {"name": "llama-swap", "version": "0.1.0"}}
    assert set(snapshot["architecture"]) == {"name", "raw_name"}
    assert snapshot["architecture"]["name"] in ("x86_64", "arm64", "armv7", "ppc64le", "riscv64", "s390x", "other")
    assert {"family", "name", "version", "kernel"} <= set(snapshot["operating_system"])
    assert snapshot["operating_system"]["family"] == "linux"
    assert set(snapshot["environment"]) == {"kind", "name", "version"}
    assert snapshot["environment"]["kind"] in ("native", "container", "virtual_machine", "wsl", "other", "unknown")
    assert set(snapshot["cpu"]) == {"vendor", "model", "socket_count", "physical_core_count", "logical_thread_count"}
    assert snapshot["cpu"]["logical_thread_count"] == os.cpu_count()
    assert snapshot["memory"]["capacity_bytes"] > 0
    assert snapshot["accelerators"] == []
    json.dumps(snapshot)


def test_hardware_detection_fails_without_a_memory_size(monkeypatch):
    monkeypatch.setattr(perf, "memory_capacity", lambda: 0)
    with pytest.raises(perf.HardwareUnavailable):
        hardware_snapshot("0.1.0")


CPUINFO_TWO_SOCKETS = "".join(
    f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
    f"physical id\t: {n // 4}\ncore id\t\t: {n % 4 // 2}\nflags\t\t: fpu sse\n\n" for n in range(8))


def test_cpu_description_counts_sockets_cores_and_threads():
    assert perf.describe_cpu(perf.parse_cpuinfo(CPUINFO_TWO_SOCKETS), 8) == {
        "vendor": "GenuineIntel", "model": "Intel(R) Xeon(R) Gold 6338", "socket_count": 2,
        "physical_core_count": 4, "logical_thread_count": 8}


def test_cpu_description_without_cpuinfo_is_unknown():
    assert perf.describe_cpu([], None) == {"vendor": None, "model": None, "socket_count": None,
                                           "physical_core_count": None, "logical_thread_count": None}


@pytest.mark.parametrize(("machine", "described"), [
    ("x86_64", {"name": "x86_64", "raw_name": None}), ("AMD64", {"name": "x86_64", "raw_name": "AMD64"}),
    ("aarch64", {"name": "arm64", "raw_name": "aarch64"}), ("armv7l", {"name": "armv7", "raw_name": "armv7l"}),
    ("mips64", {"name": "other", "raw_name": "mips64"}),
])
def test_architecture_names_follow_the_schema(machine, described):
    assert perf.describe_architecture(machine) == described


def test_operating_system_from_os_release():
    os_release = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'
    assert perf.describe_operating_system("Linux", "6.8.0", os_release) == {
        "family": "linux", "name": "debian", "version": "12", "kernel": "6.8.0"}


def test_operating_system_outside_the_schema_families_keeps_its_raw_name():
    assert perf.describe_operating_system("OpenBSD", "7.5", "") == {
        "family": "other", "name": "OpenBSD", "version": "7.5", "kernel": "7.5", "raw_family": "OpenBSD"}


def test_virtual_machine_is_recognised_from_the_hypervisor_flag(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    assert perf.describe_environment("6.8.0", [{"flags": "fpu hypervisor sse"}])["kind"] == "virtual_machine"
    assert perf.describe_environment("5.15.0-microsoft-standard-WSL2", [])["kind"] == "wsl"
    assert perf.describe_environment("6.8.0", [{"flags": "fpu sse"}])["kind"] == "unknown"
