"""Routing under load: 300 requests from 30 concurrent clients over four models in two swap groups
(spec §2.12.1, §4.6), through a real llama-swap with fake upstreams.

Groups g1 {a, b} and g2 {c, d} both have `swap: true, exclusive: false`: a member replaces the other
member of its group and never touches the other group, so the forbidden pairs are (a, b) and
(c, d), while a or b may run beside c or d. Every request must be answered 200 by the model it
named, and no forbidden pair may ever run together. That is watched from two sides during the
run: llama-swap's own view (GET /running every ~50 ms: a forbidden pair must never appear
together, in any state, since a swap finishes stopping before it starts), and the operating
system's view (the upstream processes themselves: a forbidden pair must never be alive at once).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import aiohttp

from conftest import pid_alive

MODELS = {"a": "g1", "b": "g1", "c": "g2", "d": "g2"}
FORBIDDEN = [("a", "b"), ("c", "d")]
REQUESTS = 300
CLIENTS = 30
RUN_BOUND = 120.0  # the run takes ~20-40 s on a slow 2-core machine; this only stops a hang


class ProcessWatcher(threading.Thread):
    """Samples which upstream processes are alive, from the pid file and /proc, every ~20 ms.

    A pair counts as alive together only when proven: p alive, then q alive, then p alive again
    (checked in that order), so p was alive over an interval containing the moment q was seen.
    """

    def __init__(self, upstreams):
        super().__init__(daemon=True)
        self.upstreams = upstreams
        self.names: dict[int, str] = {}
        self.stop_event = threading.Event()
        self.samples = 0
        self.violations: list[tuple[str, str]] = []
        self.error: BaseException | None = None

    def name_of(self, pid: int) -> str | None:
        if pid not in self.names:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                return None
            if b"--name" not in argv:
                return None
            self.names[pid] = argv[argv.index(b"--name") + 1].decode()
        return self.names[pid]

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                pids = self.upstreams.pids()
                first = [p for p in pids if pid_alive(p)]
                second = [p for p in first if pid_alive(p)]
                alive = {self.name_of(p) for p in second} - {None}
                for x, y in FORBIDDEN:
                    if x in alive and y in alive:
                        self.violations.append((x, y))
                self.samples += 1
                time.sleep(0.02)
        except BaseException as e:  # reported by the test
            self.error = e


async def test_many_clients_over_two_swap_groups_never_run_a_forbidden_pair(start_llama_swap, upstreams):
    groups = {g: {"swap": True, "exclusive": False, "members": sorted(m for m, gg in MODELS.items() if gg == g)}
              for g in ("g1", "g2")}
    ls = start_llama_swap({
        "healthCheckTimeout": 15,
        "groups": groups,
        "models": {m: {"cmd": upstreams.cmd(name=m), "concurrencyLimit": REQUESTS} for m in MODELS},
    })
    rng = random.Random(20240607)
    plan = [(rng.choice(sorted(MODELS)), i % 3 == 0) for i in range(REQUESTS)]  # every third one streams
    next_request = iter(range(REQUESTS))
    results: list[tuple[int, str, bool, int, str]] = []  # (index, model, stream, status, problem)
    running_violations: list[tuple[float, dict]] = []
    seen_together: set[tuple[str, str]] = set()
    samples = 0
    done = asyncio.Event()

    async def one(s: aiohttp.ClientSession, index: int) -> None:
        model, stream = plan[index]
        body = {"model": model, "messages": [{"role": "user", "content": f"request {index}"}]}
        if stream:
            body.update(stream=True, responder_chunks=3, responder_delay=0.01)
        else:
            body.update(responder_sleep=0.01)
        async with s.post(ls.url + "/v1/chat/completions", json=body) as r:
            raw = await r.read()
            problem = ""
            if r.status != 200:
                problem = raw.decode(errors="replace")[:300]
            elif stream:
                events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
                if not events or events[-1] != "[DONE]" or json.loads(events[0])["model"] != model:
                    problem = f"bad stream: {events[:1]} ... {events[-1:]}"
            elif json.loads(raw)["model"] != model:
                problem = f"answered by {json.loads(raw)['model']}"
            results.append((index, model, stream, r.status, problem))

    async def client(s: aiohttp.ClientSession) -> None:
        for index in next_request:
            await one(s, index)

    async def watch_running(s: aiohttp.ClientSession) -> None:
        nonlocal samples
        while not done.is_set():
            async with s.get(ls.url + "/running") as r:
                states = {e["model"]: e["state"] for e in (await r.json())["running"]}
            samples += 1
            for x, y in FORBIDDEN:
                if x in states and y in states:
                    running_violations.append((time.monotonic(), states))
            for x in states:
                for y in states:
                    if x < y:
                        seen_together.add((x, y))
            await asyncio.sleep(0.05)

    watcher = ProcessWatcher(upstreams)
    watcher.start()
    began = time.monotonic()
    try:
        connector = aiohttp.TCPConnector(limit=CLIENTS + 5)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=RUN_BOUND)) as s, \
                aiohttp.ClientSession() as monitor:
            sampler = asyncio.create_task(watch_running(monitor))
            try:
                await asyncio.wait_for(asyncio.gather(*(client(s) for _ in range(CLIENTS))), RUN_BOUND)
            finally:
                done.set()
                await sampler
    finally:
        watcher.stop_event.set()
        await asyncio.to_thread(watcher.join, 5)
    elapsed = time.monotonic() - began

    assert watcher.error is None, repr(watcher.error)
    failures = [r for r in results if r[3] != 200 or r[4]]
    assert len(results) == REQUESTS, f"{len(results)} of {REQUESTS} requests answered"
    assert not failures, f"{len(failures)} bad answers, first: {failures[:5]}"
    assert not running_violations, f"/running showed a forbidden pair {len(running_violations)} times: {running_violations[:3]}"
    assert not watcher.violations, f"forbidden upstreams alive together: {watcher.violations[:5]}"
    assert samples >= 10 and watcher.samples >= 10, (samples, watcher.samples)
    # the rules let a member of g1 run beside a member of g2: check that this run exercised it
    assert seen_together & {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")}, seen_together
    starts = len(upstreams.pids())
    print(f"\nstress: {REQUESTS} requests in {elapsed:.1f} s, {starts} upstream starts, "
          f"{samples} /running samples, {watcher.samples} process samples")
    assert "Traceback" not in ls.output()
