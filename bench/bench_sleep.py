#!/usr/bin/env python3
"""Benchmark for `sleep`: a swap that wakes a sleeping model against one that starts it cold.

Run by hand from the repository root (not part of the pytest suite)::

    python bench/bench_sleep.py [--swaps 10] [--load 3.0] [--wake 0.5] [--sleep 0.1]

For each setting (sleep off, on) it starts llama-swap (`python -m llama_swap`) on a free port
with two models in one swap group, both `llama_swap_responder.py` standing in for vLLM: a cold
start takes `--load` seconds before the server listens, `POST /sleep` takes `--sleep` seconds and
`POST /wake_up` `--wake` seconds (the responder's /sleep and /wake_up release and take back its
fake GPU memory as vLLM's do). Requests alternate a, b, a, b, ...; every one after the first two
swaps. Reported per setting: the time from sending a request to its answer (the swap: stop or
sleep the other model, start or wake this one, relay), and the part of it beyond the server's
own configured delays (what llama-swap adds: spawning, health polling, the calls themselves).

No GPU and no vLLM are needed: the delays are the responder's, so the figures show the shape
(a wake costs the server's wake, a cold start its whole load) and llama-swap's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from harness import free_port, running_llama_swap

ROOT = Path(__file__).resolve().parent.parent
RESPONDER = ROOT / "llama_swap_responder.py"


def config(args: argparse.Namespace, sleep: bool) -> dict:
    def model(name: str) -> dict:
        cmd = [sys.executable, str(RESPONDER), "--port", "${PORT}", "--name", name,
               "--startup-delay", str(args.load), "--sleep-delay", str(args.sleep), "--wake-delay", str(args.wake)]
        entry: dict = {"cmd": shlex.join(cmd).replace("'${PORT}'", "${PORT}")}
        if sleep:
            entry["sleep"] = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}
        return entry

    return {"healthCheckTimeout": 60, "startPort": free_port() + 1,
            "models": {"a": model("a"), "b": model("b")}}


def chat(url: str, model: str) -> float:
    """Seconds from sending a chat completion to having its whole answer."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    began = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
    return time.monotonic() - began


def run(args: argparse.Namespace, sleep: bool) -> list[float]:
    with running_llama_swap(config(args, sleep), "bench-sleep-") as (url, _log):
        chat(url, "a")
        chat(url, "b")  # both loaded once: from here on, b sleeps or stops whenever a comes back
        return [chat(url, "ab"[i % 2]) for i in range(args.swaps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--load", type=float, default=3.0, help="seconds a cold start takes before it listens")
    parser.add_argument("--wake", type=float, default=0.5, help="seconds POST /wake_up takes")
    parser.add_argument("--sleep", type=float, default=0.1, help="seconds POST /sleep takes")
    args = parser.parse_args()
    print(f"# sleep benchmark\n\n{args.swaps} swaps; a cold start takes {args.load} s, a sleep {args.sleep} s, "
          f"a wake {args.wake} s; {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| sleep | swap (request to answer), median (min-max) | beyond the server's own delays, median |")
    print("|---|---|---|")
    for sleep in (False, True):
        seconds = run(args, sleep)
        own = args.sleep + args.wake if sleep else args.load
        print(f"| {'on' if sleep else 'off'} | {statistics.median(seconds) * 1000:.0f} ms "
              f"({min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f}) | "
              f"{(statistics.median(seconds) - own) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
