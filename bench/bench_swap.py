#!/usr/bin/env python3
"""Benchmark for llama-swap-py: swap overhead and relay overhead.

Run by hand from the repository root (not part of the pytest suite)::

    python bench/bench_swap.py [--swaps 10] [--requests 300] [--stream-rounds 10] [--verbose]

It starts llama-swap itself (`python -m llama_swap`) as a subprocess on a free port with a
temporary config whose upstreams are `llama_swap_responder.py`, prints a markdown report and
stops everything it started (SIGTERM to llama-swap, which stops its upstreams; anything
still alive afterwards is reported and killed by pid).

1. Swap overhead: models a and b, each a responder with `--startup-delay 1.0
   --healthy-after 0.3`. Requests alternate a, b, a, b, ... (the first, cold load is not
   counted). For each swap, overhead = (wall-clock moment the client gets the first body
   byte of the non-streaming chat completion) - (the upstream's own `ready_at`, the moment
   its /health started answering 200, read afterwards via /upstream/<model>/_responder/info).
   So it covers: noticing readiness (poll interval + probe), granting the request, relaying
   it upstream on a fresh connection and relaying the answer back.

2. Relay overhead: one model a (no startup delay). Sequential non-streaming requests,
   interleaved through the proxy and straight to the upstream (the `proxy` URL from
   GET /running), one aiohttp session per path: p50/p90 latency of each and the added p50.
   Then streams of 2000 SSE events with no delay, interleaved: events/s through the proxy
   divided by events/s direct.

Only the standard library and aiohttp are used. The config is written as JSON, which is
valid YAML, so no YAML library is needed here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESPONDER = ROOT / "llama_swap_responder.py"
PY = sys.executable

STARTUP_DELAY = 1.0
HEALTHY_AFTER = 0.3
CHAT = "/v1/chat/completions"
TIMEOUT = aiohttp.ClientTimeout(total=60)

GO_CONTEXT = """\
Context, not measured: the Go llama-swap (proxy/process.go, Process.start) sleeps 250 ms
after spawning the upstream, then probes checkEndpoint and sleeps healthCheckLoopInterval
between failed probes. With a 1 s interval, readiness that happens at a moment the poller
cannot predict is noticed 0-1000 ms late, ~500 ms on average, for a load like this one
(ready ~1.3 s + process start after spawn). Note: the mostlygeek/llama-swap
proxy/process.go versions checked when this was written set the default interval to 5 s
("default, can not be set by user"), which would mean 0-5000 ms, ~2500 ms on average."""


# ---------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(count: int) -> int:
    """A port p such that p .. p+count-1 are all free right now (for startPort)."""
    for _ in range(50):
        port = free_port()
        if port + count < 65536 and all(port_is_free(port + i) for i in range(count)):
            return port
    raise RuntimeError(f"no run of {count} free ports found")


def pid_alive(pid: int) -> bool:
    """True for a live process; zombies count as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc/self")
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def spawned_at(pid: int) -> float | None:
    """time.time() at which a live process was started (from /proc, 1/CLK_TCK resolution)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rfind(b")") + 2:].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class LlamaSwap:
    """A llama-swap process with a temporary config; use as an async context manager."""

    def __init__(self, workdir: Path, models: dict[str, list[str]]):
        self.workdir = workdir
        self.pid_file = workdir / "upstream-pids"
        self.pid_file.touch()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "healthCheckTimeout": 15,
            "startPort": free_port_run(len(models)),
            "models": {
                name: {"cmd": " ".join(shlex.quote(a) for a in [
                    PY, str(RESPONDER), "--port", "${PORT}", "--name", name,
                    "--pid-file", str(self.pid_file), *args])}
                for name, args in models.items()
            },
        }
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "llama-swap.log"
        self.proc: subprocess.Popen | None = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def __aenter__(self) -> "LlamaSwap":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "llama_swap", "--config", str(self.config_path),
                 "--listen", f"127.0.0.1:{self.port}"],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 20
        while "listening on" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"llama-swap did not start:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.stop()
        if exc_type is not None and not issubclass(exc_type, (asyncio.CancelledError, KeyboardInterrupt)):
            tail = "\n".join(self.output().splitlines()[-30:])
            print(f"--- last lines of the llama-swap log ---\n{tail}", file=sys.stderr)

    async def stop(self) -> None:
        """SIGTERM llama-swap and wait; then make sure no upstream it started is left."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 40
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                print(f"WARNING: llama-swap (pid {proc.pid}) ignored SIGTERM for 40 s; killing its group",
                      file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pids = [int(p) for p in self.pid_file.read_text().split()] if self.pid_file.exists() else []
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftovers = [p for p in pids if pid_alive(p)]
        for pid in leftovers:
            print(f"WARNING: upstream pid {pid} still alive after llama-swap exited; killing it",
                  file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------
# statistics and formatting


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# ---------------------------------------------------------------------------------------
# 1. swap overhead


async def timed_first_byte(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, float]:
    """(time.time() at send, time.time() when the first body byte is in hand); body drained."""
    sent = time.time()
    async with session.post(url, json=body) as resp:
        first = await resp.content.readany()
        t_first = time.time()
        rest = await resp.read()
        if resp.status != 200 or not first:
            raise RuntimeError(f"POST {url} -> {resp.status}: {(first + rest)[:500]!r}")
    return sent, t_first


def breakdown_rows(rows: list[dict]) -> list[list[str]]:
    """Where send -> ready goes, when /proc gave the new upstream's start time."""
    if any(r["to_spawn"] is None for r in rows):
        return []
    out = []
    for key, label in (("to_spawn", "- request sent -> new upstream spawned (stop old + spawn, ms)"),
                       ("startup", "- spawned -> ready_at (interpreter start + delays, ms)")):
        values = [r[key] for r in rows]
        out.append([label, ms(statistics.median(values)), ms(min(values)), ms(max(values))])
    return out


async def bench_swaps(workdir: Path, swaps: int, verbose: bool) -> str:
    slow = ["--startup-delay", str(STARTUP_DELAY), "--healthy-after", str(HEALTHY_AFTER)]
    rows = []
    async with LlamaSwap(workdir, {"a": slow, "b": slow}) as ls, \
            aiohttp.ClientSession(timeout=TIMEOUT) as session:
        order = ["a"] + ["b" if i % 2 == 0 else "a" for i in range(swaps)]
        for index, model in enumerate(order):
            sent, first = await timed_first_byte(session, ls.url + CHAT, chat_body(model))
            async with session.get(f"{ls.url}/upstream/{model}/_responder/info") as resp:
                info = await resp.json(content_type=None)
            if info.get("name") != model or info.get("ready_at") is None:
                raise RuntimeError(f"unexpected upstream info for {model}: {info}")
            if index == 0:
                continue  # the cold load is not a swap
            ready = info["ready_at"]
            spawned = spawned_at(info["pid"])
            rows.append({"model": model, "overhead": first - ready, "total": first - sent,
                         "to_ready": ready - sent, "probes": info["health_checks"],
                         "to_spawn": None if spawned is None else spawned - sent,
                         "startup": None if spawned is None else ready - spawned})
            if verbose:
                spawn_text = "" if spawned is None else f"send->spawn {ms(spawned - sent)} ms, "
                print(f"  swap {index:2d} -> {model}: overhead {ms(first - ready)} ms, {spawn_text}"
                      f"send->ready {ms(ready - sent)} ms, total {ms(first - sent)} ms, "
                      f"health probes answered {info['health_checks']}", flush=True)

    over = [r["overhead"] for r in rows]
    total = [r["total"] for r in rows]
    to_ready = [r["to_ready"] for r in rows]
    probes = [r["probes"] for r in rows]
    out = [f"### Swap overhead ({len(rows)} swaps, upstream: --startup-delay {STARTUP_DELAY:g} "
           f"--healthy-after {HEALTHY_AFTER:g})", ""]
    out.append(table(
        ["figure", "median", "min", "max"],
        [["overhead: first body byte - upstream ready_at (ms)",
          ms(statistics.median(over)), ms(min(over)), ms(max(over))],
         ["swap total: request sent -> first body byte (ms)",
          ms(statistics.median(total)), ms(min(total)), ms(max(total))],
         ["of which: request sent -> upstream ready_at (ms)",
          ms(statistics.median(to_ready)), ms(min(to_ready)), ms(max(to_ready))]]
        + breakdown_rows(rows)
        + [["/health probes the upstream answered per load",
            f"{statistics.median(probes):g}", f"{min(probes)}", f"{max(probes)}"]]))
    out += ["", GO_CONTEXT]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# 2. relay overhead


async def timed_request(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    start = time.perf_counter()
    async with session.post(url, json=body) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {url} -> {resp.status}: {data[:300]!r}")
    return time.perf_counter() - start


async def timed_stream(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, float]:
    """(number of `data:` events, seconds from send to end of stream)."""
    start = time.perf_counter()
    events, tail = 0, b""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST {url} -> {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_any():
            buf = tail + chunk
            events += buf.count(b"data:")
            tail = buf[-4:]  # shorter than "data:", so never counted twice
    return events, time.perf_counter() - start


async def bench_relay(workdir: Path, requests: int, rounds: int, chunks: int) -> str:
    async with LlamaSwap(workdir, {"a": []}) as ls, \
            aiohttp.ClientSession(timeout=TIMEOUT) as proxied, \
            aiohttp.ClientSession(timeout=TIMEOUT) as direct:
        await timed_request(proxied, ls.url + CHAT, chat_body("a"))  # load the model
        async with proxied.get(ls.url + "/running") as resp:
            running = (await resp.json(content_type=None))["running"]
        upstream = running[0]["proxy"].rstrip("/")
        paths = {"proxied": (proxied, ls.url + CHAT), "direct": (direct, upstream + CHAT)}

        body = chat_body("a")
        for _ in range(10):  # warm both connection pools
            for session, url in paths.values():
                await timed_request(session, url, body)
        lat: dict[str, list[float]] = {"proxied": [], "direct": []}
        for i in range(requests):
            names = ("proxied", "direct") if i % 2 == 0 else ("direct", "proxied")
            for name in names:
                session, url = paths[name]
                lat[name].append(await timed_request(session, url, body))

        stream_body = chat_body("a", stream=True, responder_chunks=chunks, responder_delay=0)
        eps: dict[str, list[float]] = {"proxied": [], "direct": []}
        totals = {"proxied": [0, 0.0], "direct": [0, 0.0]}  # events, seconds
        expected = chunks + 2  # content chunks, the final chunk with usage, [DONE]
        for session, url in paths.values():  # one unmeasured stream each
            await timed_stream(session, url, stream_body)
        for i in range(rounds):
            names = ("proxied", "direct") if i % 2 == 0 else ("direct", "proxied")
            for name in names:
                session, url = paths[name]
                count, took = await timed_stream(session, url, stream_body)
                if count != expected:
                    raise RuntimeError(f"{name} stream: {count} events, expected {expected}")
                eps[name].append(count / took)
                totals[name][0] += count
                totals[name][1] += took

    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    p90 = {k: percentile(v, 90) for k, v in lat.items()}
    med_eps = {k: statistics.median(v) for k, v in eps.items()}
    agg = {k: n / t for k, (n, t) in totals.items()}
    out = [f"### Relay overhead ({requests} non-streaming requests per path, sequential, interleaved)", ""]
    out.append(table(
        ["path", "p50 (ms)", "p90 (ms)"],
        [["direct to upstream", ms(p50["direct"]), ms(p90["direct"])],
         ["through llama-swap", ms(p50["proxied"]), ms(p90["proxied"])],
         ["added by llama-swap", ms(p50["proxied"] - p50["direct"]), ms(p90["proxied"] - p90["direct"])]]))
    out += ["", f"### Streaming throughput ({rounds} streams per path of {expected} SSE events, "
                "responder_delay 0, interleaved)", ""]
    def eps_row(label: str, key: str) -> list[str]:
        return [label, f"{agg[key]:.0f}", f"{med_eps[key]:.0f}", f"{min(eps[key]):.0f}", f"{max(eps[key]):.0f}"]

    out.append(table(
        ["path", "events/s (all streams)", "median", "min", "max"],
        [eps_row("direct to upstream", "direct"), eps_row("through llama-swap", "proxied"),
         ["ratio proxied / direct", f"{agg['proxied'] / agg['direct']:.2f}",
          f"{med_eps['proxied'] / med_eps['direct']:.2f}", "", ""]]))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llama-swap-py swap and relay benchmark")
    parser.add_argument("--swaps", type=int, default=10,
                        help="swaps to time, after the cold load (default 10, at least 8 recommended)")
    parser.add_argument("--requests", type=int, default=300, help="non-streaming requests per path (default 300)")
    parser.add_argument("--stream-rounds", type=int, default=10, help="measured streams per path (default 10)")
    parser.add_argument("--stream-chunks", type=int, default=2000, help="content chunks per stream (default 2000)")
    parser.add_argument("--verbose", action="store_true", help="print each swap as it is timed")
    args = parser.parse_args(argv)
    if args.swaps < 1 or args.requests < 1 or args.stream_rounds < 1 or args.stream_chunks < 1:
        parser.error("counts must be positive")
    return args


async def run(args: argparse.Namespace) -> None:
    began = time.monotonic()
    print(f"# llama-swap-py benchmark\n\nPython {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        swap_dir = Path(tmp, "swap")
        relay_dir = Path(tmp, "relay")
        swap_dir.mkdir()
        relay_dir.mkdir()
        print(await bench_swaps(swap_dir, args.swaps, args.verbose) + "\n", flush=True)
        print(await bench_relay(relay_dir, args.requests, args.stream_rounds, args.stream_chunks) + "\n", flush=True)
    print(f"(benchmark took {time.monotonic() - began:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
