#!/usr/bin/env python3
"""What the relay costs, per chunk and per request, and what the proxy weighs: llama-swap
against the same upstream reached directly, measured interleaved.

    python bench/bench_relay.py                     # every figure, the installed llama_swap
    python bench/bench_relay.py --pyz dist/llama-swap.pyz   # and a single-file build beside it
    python bench/bench_relay.py --go /tmp/go-llama-swap/llama-swap   # and the Go original beside it
    python bench/bench_relay.py --profile relay.prof         # where llama-swap's time goes
    python bench/bench_relay.py --capture-buffer 0          # with captures off (captureBuffer: 0)

Every proxy runs at once, each with its own copy of the upstream, and the figures take the
proxies in turn, so that one column can be compared with another: one table, a column per proxy.

The upstream is a paced SSE server in its own process (this file, run with --upstream): each
event carries the moment it was written, so a client knows each event's delay. Figures:

1. paced stream: 5 streams of 200 events, one every 5 ms; per event, arrival − send time;
   the median through llama-swap minus the median direct is what the relay adds per chunk.
2. small requests: 400 sequential non-streaming requests, alternately direct and proxied;
   p50 and p99 of each, and what the proxy adds; then the proxy's own CPU time (from /proc,
   threads included) per request over 1,000 more.
3. throughput: 16 clients sending small requests for 4 s, proxied and then direct: requests
   per second through the proxy divided by direct.
4. burst stream: 3 streams of 5,000 events written as fast as the upstream can: events per
   second through the proxy divided by direct.
5. memory: the proxy's RSS once healthy (before any request), idle after the figures above
   (with what its bounded histories keep of them), and with 100 slow streams open.
6. start: from exec to the first 200 from /health (5 starts, median).

--profile runs the installed llama-swap under cProfile for the paced and burst streams and the
requests (the other columns are measured as usual; memory and start are left out), then prints
the functions with the most time of their own; the whole profile is kept in the named file
(read it with `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from harness import ROOT, free_port

CHAT = "/v1/chat/completions"
GO = "Go original"  # the column of --go's build
TIMEOUT = aiohttp.ClientTimeout(total=120)


# The paced upstream ##########################################################################

async def paced_stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "model": body.get("model", ""),
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}]})
    events, every = int(body.get("events", 200)), float(body.get("every", 0.005))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    began = time.monotonic()
    for i in range(events):
        if every:
            await asyncio.sleep(max(0.0, began + i * every - time.monotonic()))
        event = {"t": time.time(), "i": i, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def serve_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_post(CHAT, paced_stream)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# Starting the proxies #########################################################################

@dataclass
class Proxy:
    """One build under test, a column of the table."""
    name: str
    argv: list[str]  # without --config and --listen, which every build takes alike (Go's flags take -- too)


@dataclass
class Target:
    """A proxy that is running, and the upstream it started, reached directly."""
    proc: subprocess.Popen
    url: str
    rss_started: float  # MiB once healthy, before any request: what the build needs before its histories fill
    direct: str = ""
    event_loop: bool = True  # its main thread is where every request waits its turn (not Go's)

    def path(self, which: str) -> str:
        return self.url if which == "proxy" else self.direct


def proxies(args: argparse.Namespace, profile: str | None = None) -> list[Proxy]:
    """The installed module (under cProfile with a profile file), then --pyz's and --go's builds if given.
    Paths are resolved here because the proxies run in the repository root."""
    module = ["-m", "cProfile", "-o", profile, "-m", "llama_swap"] if profile else ["-m", "llama_swap"]
    found = [Proxy("python -m llama_swap", [sys.executable, *module])]
    if args.pyz:
        found.append(Proxy("pyz", [sys.executable, str(Path(args.pyz).resolve())]))
    if args.go:
        found.append(Proxy(GO, [str(Path(args.go).resolve())]))
    return found


def version(proxy: Proxy) -> str:
    """What the build says it is; every build answers --version."""
    done = subprocess.run([*proxy.argv, "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip().splitlines()[0]


@contextlib.contextmanager
def llama_swap(argv: list[str], work: Path, log_level: str = "info", capture_buffer: int | None = None):
    """A proxy with one model, `paced` (this file's upstream role), until the block ends."""
    config = {"logLevel": log_level,
              # Its own first upstream port, so that proxies running side by side never pick the same one.
              "startPort": free_port(),
              # Above the 100 streams of the memory figure: past the limit a request gets a 429.
              "models": {"paced": {"cmd": f"{sys.executable} {Path(__file__).resolve()} --upstream ${{PORT}}",
                                   "concurrencyLimit": 128}}}
    if capture_buffer is not None:  # else the proxy's own default
        config["captureBuffer"] = capture_buffer
    (work / "config.yaml").write_text(json.dumps(config))
    port = free_port()
    log = open(work / "llama-swap.log", "wb")
    began = time.monotonic()
    proc = subprocess.Popen([*argv, "--config", str(work / "config.yaml"), "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(work)})
    try:
        yield proc, f"http://127.0.0.1:{port}", began
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


async def until_healthy(url: str, began: float) -> float:
    async with aiohttp.ClientSession() as s:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return time.monotonic() - began
            await asyncio.sleep(0.002)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time the process (or one of its threads) has used so far."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# Measurements #################################################################################

Row = tuple[str, list[str]]  # a figure's label and its value for each proxy, in column order
Samples = dict[str, list[float]]  # "direct" and "proxy": what one proxy's two paths gave


async def stream_delays(s: aiohttp.ClientSession, url: str, events: int, every: float) -> tuple[list[float], float]:
    """Each event's delay (arrival − written) and the stream's events per second."""
    delays, began = [], time.monotonic()
    async with s.post(url + CHAT, json={"model": "paced", "stream": True, "events": events, "every": every}) as r:
        assert r.status == 200, r.status  # a refused stream would count as one with no delay at all
        async for line in r.content:
            if line.startswith(b"data: {"):
                delays.append(time.time() - json.loads(line[6:])["t"])
    return delays, len(delays) / (time.monotonic() - began)


async def small_request(s: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with s.post(url + CHAT, json={"model": "paced", "messages": [{"role": "user", "content": "hi"}]}) as r:
        await r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - began


async def throughput(url: str, clients: int, seconds: float) -> float:
    done, stop = 0, time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await small_request(s, url)
                done += 1
        await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def interleaved(targets: list[Target], rounds: int,
                      sample: Callable[[str], Awaitable[list[float]]]) -> list[Samples]:
    """`sample` taken `rounds` times on each path of each proxy, in turn, so that whatever else the
    machine does in the meantime falls on every path alike."""
    samples: list[Samples] = [{"direct": [], "proxy": []} for _ in targets]
    for _ in range(rounds):
        for target, got in zip(targets, samples):
            for which in ("direct", "proxy"):
                got[which] += await sample(target.path(which))
    return samples


async def cpu_per_request(s: aiohttp.ClientSession, target: Target, requests: int) -> tuple[float, float]:
    """The proxy's CPU time per sequential small request: all of it, and its main thread's (for
    llama-swap, the event loop; its other threads record activity rows and write the log). One
    proxy at a time: CPU time hardly depends on what else runs, and the others' turns would add
    this one's idle CPU to the count."""
    pid = target.proc.pid
    used, looped = cpu_seconds(pid), cpu_seconds(pid, pid)
    for _ in range(requests):
        await small_request(s, target.url)
    await asyncio.sleep(0.2)  # the rows of the last requests are written after their answers
    return (cpu_seconds(pid) - used) / requests, (cpu_seconds(pid, pid) - looped) / requests


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def added(samples: list[Samples], at: Callable[[list[float]], float]) -> list[str]:
    """Proxied minus direct at one statistic, per proxy."""
    return [ms(at(got["proxy"]) - at(got["direct"])) for got in samples]


async def paced_rows(s: aiohttp.ClientSession, targets: list[Target], rounds: int) -> list[Row]:
    async def paced(url: str) -> list[float]:
        return (await stream_delays(s, url, 200, 0.005))[0]

    streams = await interleaved(targets, rounds, paced)
    return [("paced stream, delay per chunk: direct / proxied, median",
             [f"{ms(statistics.median(got['direct']))} / {ms(statistics.median(got['proxy']))}" for got in streams]),
            ("paced stream, delay added per chunk, median", added(streams, statistics.median)),
            ("paced stream, delay added per chunk, p90", added(streams, lambda values: pct(values, 0.9)))]


async def request_rows(s: aiohttp.ClientSession, targets: list[Target]) -> list[Row]:
    async def small(url: str) -> list[float]:
        return [await small_request(s, url)]

    requests = await interleaved(targets, 200, small)
    used = [await cpu_per_request(s, target, 1000) for target in targets]
    rows = [("proxy's CPU time per small request (1,000 sequential): all threads / main thread",
             [f"{ms(every)} / {ms(main)}" if target.event_loop else f"{ms(every)} / -"
              for (every, main), target in zip(used, targets)])]
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        rows.append((f"small request {label}: direct / proxied / added",
                     [f"{ms(pct(got['direct'], q))} / {ms(pct(got['proxy'], q))} / "
                      f"{ms(pct(got['proxy'], q) - pct(got['direct'], q))}" for got in requests]))
    return rows


async def burst_row(s: aiohttp.ClientSession, targets: list[Target]) -> Row:
    async def burst(url: str) -> list[float]:
        return [(await stream_delays(s, url, 5000, 0))[1]]

    bursts = await interleaved(targets, 3, burst)
    return ("burst stream events/s, proxied / direct",
            [f"{statistics.median(got['proxy']) / statistics.median(got['direct']):.2f}" for got in bursts])


async def throughput_row(targets: list[Target]) -> Row:
    rates = []
    for target in targets:
        proxied, straight = await throughput(target.url, 16, 4), await throughput(target.direct, 16, 4)
        rates.append(f"{proxied / straight:.2f} ({proxied:.0f} / {straight:.0f})")
    return ("throughput, 16 clients: proxied / direct (requests/s)", rates)


async def measure(targets: list[Target], rounds: int) -> list[Row]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for target in targets:
            await small_request(s, target.url)  # the model is started by the first request
            async with s.get(target.url + "/running") as r:
                target.direct = (await r.json())["running"][0]["proxy"]
        rows = await paced_rows(s, targets, rounds) + await request_rows(s, targets)
        rows.append(await burst_row(s, targets))
    return [*rows, await throughput_row(targets)]


async def memory(target: Target) -> str:
    """RSS once started, idle after the figures above, and with 100 slow streams open (each 4 s
    long, measured after 2 s)."""
    idle = rss_mib(target.proc.pid)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        streams = [asyncio.ensure_future(stream_delays(s, target.url, 40, 0.1)) for _ in range(100)]
        await asyncio.sleep(2.0)
        busy = rss_mib(target.proc.pid)
        await asyncio.gather(*streams)
    return f"{target.rss_started:.0f} / {idle:.0f} / {busy:.0f} MiB"


async def start_times(columns: list[Proxy], starts: int = 5) -> Row:
    """Exec to the first 200 from /health, the proxies started in turn."""
    times: list[list[float]] = [[] for _ in columns]
    for _ in range(starts):
        for proxy, got in zip(columns, times):
            with tempfile.TemporaryDirectory(prefix="bench-relay-") as scratch, \
                    llama_swap(proxy.argv, Path(scratch)) as (_, url, began):
                got.append(await until_healthy(url, began))
    return (f"start to first /health 200, median of {starts}", [f"{statistics.median(got):.3f} s" for got in times])


def print_table(columns: list[Proxy], rows: list[Row]) -> None:
    print("| figure | " + " | ".join(proxy.name for proxy in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, values in rows:
        print(f"| {label} | " + " | ".join(values) + " |")


async def run(args: argparse.Namespace) -> None:
    profile = str(Path(args.profile).resolve()) if args.profile else None
    columns = proxies(args, profile)
    for proxy in proxies(args):  # not under cProfile, which would write the profile file
        print(f"{proxy.name}: {' '.join(proxy.argv)}: {version(proxy)}")
    print()
    with contextlib.ExitStack() as stack:  # every proxy runs, each with its own upstream, until all are measured
        targets = []
        for proxy in columns:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-relay-")))
            proc, url, began = stack.enter_context(llama_swap(proxy.argv, work, args.log_level, args.capture_buffer))
            await until_healthy(url, began)
            targets.append(Target(proc, url, rss_mib(proc.pid), event_loop=proxy.name != GO))
        rows = await measure(targets, args.rounds)
        if not profile:
            rows.append(("RSS started / idle after the figures above / with 100 open streams",
                         [await memory(target) for target in targets]))
    if not profile:
        rows.append(await start_times(columns))
    print_table(columns, rows)
    if profile:
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # the paced upstream's role
    parser.add_argument("--pyz", help="measure this single-file build too, in a column of its own")
    parser.add_argument("--go", metavar="BINARY", help="measure this build of the Go original too (see README)")
    parser.add_argument("--profile", help="run the installed llama-swap under cProfile, keep the profile in this "
                        "file (the memory and start figures are left out)")
    parser.add_argument("--log-level", default="info", help="the proxies' logLevel (default info, as installed; "
                        "their logs go to files)")
    parser.add_argument("--capture-buffer", type=int, metavar="MB", help="the proxies' captureBuffer (default: "
                        "theirs, 5 MB; 0 turns captures off)")
    parser.add_argument("--rounds", type=int, default=5, help="paced streams per path (default 5)")
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile (default 30)")
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
