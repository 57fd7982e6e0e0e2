#!/usr/bin/env python3
"""What the relay costs, per chunk and per request, and what the proxy weighs: llama-swap
against the same upstream reached directly, measured interleaved.

    python bench/bench_relay.py                     # every figure, the installed llama_swap
    python bench/bench_relay.py --pyz dist/llama-swap.pyz   # the same for a single-file build
    python bench/bench_relay.py --profile relay.prof         # where llama-swap's time goes

The upstream is a paced SSE server in its own process (this file, run with --upstream): each
event carries the moment it was written, so a client knows each event's delay. Figures:

1. paced stream: 5 streams of 200 events, one every 5 ms; per event, arrival − send time;
   the median through llama-swap minus the median direct is what the relay adds per chunk.
2. small requests: 400 sequential non-streaming requests, alternately direct and proxied;
   p50 and p99 of each, and what the proxy adds.
3. throughput: 16 clients sending small requests for 4 s, proxied and then direct: requests
   per second through the proxy divided by direct.
4. burst stream: 3 streams of 5,000 events written as fast as the upstream can: events per
   second through the proxy divided by direct.
5. memory: llama-swap's RSS once started and idle, and with 100 slow streams open.
6. start: from exec to the first 200 from /health (5 starts, median).

--profile runs llama-swap under cProfile for the paced and burst streams and the requests,
then prints the functions with the most time of their own; the whole profile is kept in the
named file (read it with `python -m pstats FILE`).
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
from pathlib import Path

import aiohttp
from aiohttp import web

from harness import ROOT, free_port

CHAT = "/v1/chat/completions"
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


# Starting llama-swap ##########################################################################

def llama_swap_argv(args: argparse.Namespace, profile: str | None = None) -> list[str]:
    if args.pyz:
        return [sys.executable, args.pyz]
    if profile:
        return [sys.executable, "-m", "cProfile", "-o", profile, "-m", "llama_swap"]
    return [sys.executable, "-m", "llama_swap"]


@contextlib.contextmanager
def llama_swap(argv: list[str], work: Path, log_level: str = "info"):
    """llama-swap with one model, `paced` (this file's upstream role), until the block ends."""
    config = {"logLevel": log_level, "models": {"paced": {"cmd": f"{sys.executable} {Path(__file__).resolve()} "
                                                              "--upstream ${PORT}", "concurrencyLimit": 64}}}
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# Measurements #################################################################################

async def stream_delays(s: aiohttp.ClientSession, url: str, events: int, every: float) -> tuple[list[float], float]:
    """Each event's delay (arrival − written) and the stream's events per second."""
    delays, began = [], time.monotonic()
    async with s.post(url + CHAT, json={"model": "paced", "stream": True, "events": events, "every": every}) as r:
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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def measure(proxy: str, rounds: int, pid: int) -> list[tuple[str, str]]:
    rows = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await small_request(s, proxy)  # the model is started by the first request
        async with s.get(proxy + "/running") as r:
            direct = (await r.json())["running"][0]["proxy"]
        paced = {"direct": [], "proxy": []}
        for _ in range(rounds):
            for name, url in (("direct", direct), ("proxy", proxy)):
                paced[name] += (await stream_delays(s, url, 200, 0.005))[0]
        added = statistics.median(paced["proxy"]) - statistics.median(paced["direct"])
        rows.append(("paced stream, delay per chunk: direct / proxied, median",
                     f"{ms(statistics.median(paced['direct']))} / {ms(statistics.median(paced['proxy']))}"))
        rows.append(("paced stream, delay added per chunk, median", ms(added)))
        rows.append(("paced stream, delay added per chunk, p90",
                     ms(pct(paced["proxy"], 0.9) - pct(paced["direct"], 0.9))))
        small = {"direct": [], "proxy": []}
        for _ in range(200):
            for name, url in (("direct", direct), ("proxy", proxy)):
                small[name].append(await small_request(s, url))
        used = cpu_seconds(pid)
        for _ in range(1000):
            await small_request(s, proxy)
        rows.append(("llama-swap's CPU time per small request (1,000 sequential)",
                     ms((cpu_seconds(pid) - used) / 1000)))
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            rows.append((f"small request {label}: direct / proxied / added",
                         f"{ms(pct(small['direct'], q))} / {ms(pct(small['proxy'], q))} / "
                         f"{ms(pct(small['proxy'], q) - pct(small['direct'], q))}"))
        burst = {"direct": [], "proxy": []}
        for _ in range(3):
            for name, url in (("direct", direct), ("proxy", proxy)):
                burst[name].append((await stream_delays(s, url, 5000, 0))[1])
        rows.append(("burst stream events/s, proxied / direct",
                     f"{statistics.median(burst['proxy']) / statistics.median(burst['direct']):.2f}"))
    proxied, straight = await throughput(proxy, 16, 4), await throughput(direct, 16, 4)
    rows.append(("throughput, 16 clients: proxied / direct (requests/s)", f"{proxied / straight:.2f} "
                 f"({proxied:.0f} / {straight:.0f})"))
    return rows


async def memory(proc: subprocess.Popen, proxy: str) -> list[tuple[str, str]]:
    idle = rss_mib(proc.pid)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        streams = [asyncio.ensure_future(stream_delays(s, proxy, 40, 0.1)) for _ in range(100)]
        await asyncio.sleep(2.0)
        busy = rss_mib(proc.pid)
        await asyncio.gather(*streams)
    return [("RSS idle / with 100 open streams", f"{idle:.0f} / {busy:.0f} MiB")]


async def start_times(args: argparse.Namespace) -> list[tuple[str, str]]:
    times = []
    for _ in range(5):
        with tempfile.TemporaryDirectory(prefix="bench-relay-") as scratch, \
                llama_swap(llama_swap_argv(args), Path(scratch)) as (_, url, began):
            times.append(await until_healthy(url, began))
    return [("start to first /health 200, median of 5", f"{statistics.median(times):.3f} s")]


async def run(args: argparse.Namespace) -> None:
    profile = str(Path(args.profile).resolve()) if args.profile else None
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as scratch, \
            llama_swap(llama_swap_argv(args, profile), Path(scratch), args.log_level) as (proc, proxy, began):
        await until_healthy(proxy, began)
        rows = await measure(proxy, args.rounds, proc.pid)
        if not profile:
            rows += await memory(proc, proxy)
    if not profile:
        rows += await start_times(args)
    print(f"| figure ({'.pyz ' + args.pyz if args.pyz else 'python -m llama_swap'}) | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    if profile:
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # the paced upstream's role
    parser.add_argument("--pyz", help="measure this single-file build instead of the installed module")
    parser.add_argument("--profile", help="run llama-swap under cProfile, keep the profile in this file")
    parser.add_argument("--log-level", default="info", help="llama-swap's logLevel (default info, as installed; "
                        "its log goes to a file)")
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
