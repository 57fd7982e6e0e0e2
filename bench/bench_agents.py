#!/usr/bin/env python3
"""Anti-thrash bench: agents alternating two models that cannot run together.

Run by hand from anywhere (not part of the pytest suite; Linux only, it reads /proc)::

    python bench/bench_agents.py [--rounds 5] [--agents 4] [--seed 1]

Two responder models, an orchestrator `o` and a coder `c`, in one swap group, so only one runs
at a time; each takes STARTUP_DELAY s to load. Every agent loops: ask o, think, ask c (sometimes
twice in a row), think; each request asks the responder to work a while (`responder_sleep`).
The workload is drawn once from --seed and replayed against a fresh llama-swap for each scheduler
configuration in CONFIGS, from strict arrival order (`maxWaitMs: 0`, which swaps whenever the
next request in line wants the other model) to settings that let a model in steady use keep
serving. One markdown table row per configuration: upstream starts (from the responders' pid
file), makespan, each request's wait (p50 / p95 / max) and the longest wait for a swap; the
note printed under the table says what each column means.

llama-swap and the responders are started by the tests' harness (tests/helpers.py), so this
needs the test dependencies (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]  # llama_swap from this checkout

from bench_swap import CHAT, TIMEOUT, chat_body, percentile, spawned_at, table, timed_first_byte  # noqa: E402
from helpers import LlamaSwap, Upstreams  # noqa: E402
from soak import stop  # noqa: E402
from test_load import ProcessWatcher  # noqa: E402

STARTUP_DELAY = 1.5  # a small model's load, short enough to run several configurations in minutes
WORK = (0.2, 0.5)  # seconds a request keeps its model busy (responder_sleep)
THINK = (0.1, 0.4)  # seconds an agent spends between its requests
CONFIGS = {  # label -> routing.scheduler.settings.fifo
    "`maxWaitMs: 0` (strict arrival order)": {"maxWaitMs": 0},
    "defaults (`maxWaitMs: 10000`, `minResidencyMs: 0`)": {},
    "`maxWaitMs: 2000`": {"maxWaitMs": 2000},
    "`minResidencyMs: 3000`": {"minResidencyMs": 3000},
}
COLUMNS = ["configuration", "model starts", "makespan (s)", "wait p50 (s)", "wait p95 (s)", "wait max (s)",
           "longest wait for a swap (s)"]
NOTE = ("model starts: upstream processes started (the first, cold load included); makespan: first request "
        "sent to last answer; wait: sending a request to its first byte, minus the responder_sleep it asked "
        "for (so queueing, swaps and the relay); longest wait for a swap: sending a request to the start "
        "of the upstream that answered it, over the requests that saw their model started, i.e. how long a "
        "request was kept in line before its model began to load.")


# ---------------------------------------------------------------------------------------
# the workload


@dataclass(frozen=True)
class Step:
    model: str  # "" while the agent thinks
    seconds: float  # the request's responder_sleep, or the thinking time


def agent_plan(rng: random.Random, rounds: int) -> list[Step]:
    steps = [Step("", rng.uniform(0, 1))]  # so the agents do not start in lockstep
    for _ in range(rounds):
        steps += [Step("o", rng.uniform(*WORK)), Step("", rng.uniform(*THINK))]
        for _ in range(2 if rng.random() < 0.3 else 1):  # the coder is sometimes asked twice in a row
            steps += [Step("c", rng.uniform(*WORK)), Step("", rng.uniform(*THINK))]
    return steps


def workload(seed: int, agents: int, rounds: int) -> list[list[Step]]:
    # One generator per agent, so more rounds extend the same plans instead of drawing new ones.
    return [agent_plan(random.Random(f"{seed}-{agent}"), rounds) for agent in range(agents)]


@dataclass(frozen=True)
class Answered:
    model: str
    work: float
    sent: float  # time.time()
    first_byte: float

    @property
    def wait(self) -> float:
        return self.first_byte - self.sent - self.work


async def run_agent(session: aiohttp.ClientSession, url: str, plan: list[Step], answered: list[Answered]) -> None:
    for step in plan:
        if not step.model:
            await asyncio.sleep(step.seconds)
            continue
        sent, first_byte = await timed_first_byte(session, url, chat_body(step.model, responder_sleep=step.seconds))
        answered.append(Answered(step.model, step.seconds, sent, first_byte))


# ---------------------------------------------------------------------------------------
# one configuration


class StartWatcher(ProcessWatcher):
    """The load test's process watcher (pid file and /proc every ~20 ms, in a thread of its
    own), noting also when each upstream it names was spawned."""

    def __init__(self, upstreams: Upstreams):
        super().__init__(upstreams)
        self.spawned: dict[int, float | None] = {}

    def name_of(self, pid: int) -> str | None:
        if pid not in self.spawned:
            self.spawned[pid] = spawned_at(pid)
        return super().name_of(pid)

    def starts(self, model: str) -> list[float]:
        return [at for pid, at in self.spawned.items() if at is not None and self.names.get(pid) == model]


def swap_wait(request: Answered, watcher: StartWatcher) -> float | None:
    """Sent -> spawn of the upstream that answered it, if its model was started after it was sent."""
    spawned = [at for at in watcher.starts(request.model) if request.sent < at < request.first_byte]
    return max(spawned) - request.sent if spawned else None


def scheduler_config(upstreams: Upstreams, fifo: dict) -> dict:
    return {
        "healthCheckTimeout": 30,
        "models": {m: {"cmd": upstreams.cmd("--startup-delay", str(STARTUP_DELAY), name=m)} for m in ("o", "c")},
        "routing": {"router": {"settings": {"groups": {"agents": {"swap": True, "exclusive": True,
                                                                  "members": ["o", "c"]}}}},
                    "scheduler": {"settings": {"fifo": fifo}}},
    }


async def replay(url: str, plans: list[list[Step]]) -> tuple[list[Answered], float]:
    """Every agent's plan at once; the answers and the makespan."""
    answered: list[Answered] = []
    began = time.time()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await asyncio.gather(*(run_agent(session, url + CHAT, plan, answered) for plan in plans))
    return answered, time.time() - began


def bench(label: str, fifo: dict, plans: list[list[Step]]) -> list[str]:
    """The table row of one configuration; raises if anything went wrong on the way."""
    with tempfile.TemporaryDirectory(prefix="bench-agents-") as tmp:
        upstreams = Upstreams(Path(tmp))
        ls = LlamaSwap(Path(tmp), scheduler_config(upstreams, fifo))
        try:
            with StartWatcher(upstreams) as watcher:
                answered, makespan = asyncio.run(replay(ls.url, plans))
        finally:
            clean = stop(ls, upstreams)
        if watcher.error is not None:
            raise RuntimeError(f"{label}: the process watcher failed: {watcher.error!r}")
        if "Traceback" in ls.output() or not clean:
            raise RuntimeError(f"{label}: llama-swap logged a traceback or left an upstream running:\n"
                               f"{ls.output()[-3000:]}")
        starts = len(upstreams.pids())
    waits = [a.wait for a in answered]
    swap_waits = [w for a in answered if (w := swap_wait(a, watcher)) is not None]
    return [label, str(starts), f"{makespan:.1f}", f"{percentile(waits, 50):.2f}", f"{percentile(waits, 95):.2f}",
            f"{max(waits):.2f}", f"{max(swap_waits, default=0.0):.2f}"]


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llama-swap-py anti-thrash bench: agents alternating two models")
    parser.add_argument("--rounds", type=int, default=5, help="o-then-c rounds per agent (default 5)")
    parser.add_argument("--agents", type=int, default=4, help="agents running at once (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload, the same for every configuration")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.agents < 1:
        parser.error("--rounds and --agents must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    plans = workload(args.seed, args.agents, args.rounds)
    requests = sum(1 for plan in plans for step in plan if step.model)
    print(f"# Agents alternating two models\n\n{args.agents} agents x {args.rounds} rounds (seed {args.seed}): "
          f"{requests} requests; models o and c in one swap group, {STARTUP_DELAY:g} s to load; "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n", flush=True)
    rows = []
    try:
        for label, fifo in CONFIGS.items():
            rows.append(bench(label, fifo, plans))
            print(f"done: {' | '.join(rows[-1])}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print("\n" + table(COLUMNS, rows) + "\n\n" + NOTE)
    print(f"\n(bench took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
