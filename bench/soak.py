#!/usr/bin/env python3
"""Soak: the load test's workload for minutes on end, reported as it goes.

Run by hand from anywhere (not part of the pytest suite)::

    python bench/soak.py [--minutes 10] [--clients 50] [--every 10]

The workload is tests/test_load.py's, imported from there (and llama-swap is started by the
tests' harness, tests/helpers.py): four responder models in two swap groups, g1 {a, b} and
g2 {c, d}; each client sends its next chat completion (a random model, about half of them
streamed, 16 KiB of random text that the answer echoes) as soon as its last one is answered
and checked. Every --every seconds one line: requests done, errors by kind, swaps (upstream
starts, from the pid file), p50/p99 latency of the requests that ended in that interval,
llama-swap's RSS, and how often a forbidden pair, (a, b) or (c, d), was seen running together
(by /running and by /proc). At the end one summary line for the README. Exit status 1 if any
request failed, a routing rule was broken or an upstream was left running.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # llama_swap from this checkout

from helpers import LlamaSwap, Upstreams, wait_until  # noqa: E402
from test_load import ProcessWatcher, RunningWatcher, Tally, drive, request_plan, rss_kib, swap_groups_config  # noqa: E402

WARM_UP = 120  # as in the test: RSS is compared with what it is after these


def errors_text(errors: dict[str, int]) -> str:
    return f"{sum(errors.values())} errors" + (f" {dict(errors)}" if errors else "")


def latency_text(latencies: list[float]) -> str:
    """p50 / p99 of some latencies, or a dash when there are too few."""
    if len(latencies) < 2:
        return "p50 - p99 -"
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:.0f} ms p99 {cuts[98] * 1000:.0f} ms"


class Report:
    """What is printed every interval and at the end."""

    def __init__(self, ls: LlamaSwap, upstreams: Upstreams, tally: Tally, running: RunningWatcher,
                 processes: ProcessWatcher):
        self.ls, self.upstreams, self.tally = ls, upstreams, tally
        self.running, self.processes = running, processes
        self.began = time.monotonic()
        self.starts_before = len(upstreams.pids())
        self.rss_before = self.rss_peak = rss_kib(ls.proc.pid)
        self.reported = 0  # how many latencies earlier lines covered

    def swaps(self) -> int:
        return len(self.upstreams.pids()) - self.starts_before

    def rule_breaks(self) -> int:
        return len(self.running.violations) + len(self.processes.violations)

    def line(self) -> str:
        rss = rss_kib(self.ls.proc.pid)
        self.rss_peak = max(self.rss_peak, rss)
        interval = self.tally.latencies[self.reported:]
        self.reported += len(interval)
        return (f"{time.monotonic() - self.began:6.0f} s  requests {self.tally.done:7d} (+{len(interval)})  "
                f"{errors_text(self.tally.errors)}  swaps {self.swaps()}  "
                f"{latency_text(interval)}  RSS {rss / 1024:.1f} MiB  rule breaks {self.rule_breaks()}")

    def summary(self, clients: int) -> str:
        took = time.monotonic() - self.began
        slowest = max(self.tally.latencies, default=0.0)
        rss_end = rss_kib(self.ls.proc.pid)
        return (f"soak: {took / 60:.1f} min, {clients} clients, {self.tally.done} requests "
                f"({self.tally.done / took:.0f}/s), {errors_text(self.tally.errors)}, {self.swaps()} swaps, "
                f"{latency_text(self.tally.latencies)} max {slowest:.1f} s, llama-swap RSS "
                f"{self.rss_before / 1024:.1f} MiB after warm-up -> {rss_end / 1024:.1f} MiB at the end "
                f"(peak {self.rss_peak / 1024:.1f}), {self.rule_breaks()} rule breaks")


async def soak(ls: LlamaSwap, upstreams: Upstreams, args: argparse.Namespace) -> bool:
    plan = request_plan(random.Random())
    warm_up = Tally()
    await drive(ls.url, itertools.islice(plan, WARM_UP), args.clients, warm_up)
    deadline = time.monotonic() + args.minutes * 60
    tally = Tally()
    with ProcessWatcher(upstreams) as processes:
        async with RunningWatcher(ls.url) as running:
            report = Report(ls, upstreams, tally, running, processes)
            work = asyncio.create_task(
                drive(ls.url, itertools.takewhile(lambda _: time.monotonic() < deadline, plan), args.clients, tally))
            while not work.done():
                await asyncio.wait({work}, timeout=args.every)
                print(report.line(), flush=True)
            await work
    print(report.summary(args.clients))
    for outcome in warm_up.failures + tally.failures:
        print(f"  failed: {outcome.kind} after {outcome.seconds:.1f} s: {outcome.detail}")
    if processes.error is not None:
        print(f"  the process watcher failed: {processes.error!r}")
    return not (warm_up.errors or tally.errors or report.rule_breaks() or processes.error)


def stop(ls: LlamaSwap, upstreams: Upstreams) -> bool:
    """SIGTERM llama-swap; True if it and every upstream it started are gone."""
    try:
        ls.stop()
    except subprocess.TimeoutExpired:
        print("llama-swap ignored SIGTERM; killed it", file=sys.stderr)
        ls.kill()
        return False
    if wait_until(lambda: not upstreams.alive(), 5):
        return True
    print(f"upstreams left running after llama-swap exited, killed: {upstreams.kill_leftovers()}", file=sys.stderr)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llama-swap-py soak: the load test's workload for a while")
    parser.add_argument("--minutes", type=float, default=10, help="how long to run (default 10)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--every", type=float, default=10, help="seconds between report lines (default 10)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.every <= 0:
        parser.error("--minutes, --clients and --every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        upstreams = Upstreams(Path(tmp))
        ls = LlamaSwap(Path(tmp), swap_groups_config(upstreams, clients=args.clients))
        ok = False
        try:
            ok = asyncio.run(soak(ls, upstreams, args))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        finally:
            ok = stop(ls, upstreams) and ok
        if "Traceback" in ls.output():
            print(f"llama-swap logged a traceback; its log:\n{ls.output()[-3000:]}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
